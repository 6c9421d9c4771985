"""The evaluation trainer: CE(logits) + auxiliary_weight * CE(aux_logits), and its optimiser.

Reference:
    Liu et al., DARTS, arXiv 1806.09055 (`train.py`).
"""

import keras
from keras import ops

from pibconv_tf import optim
from pibconv_tf.model import networks, numerics


@keras.saving.register_keras_serializable(package="pibconv_tf")
class AuxiliaryTrainer(keras.Model):
    """Trains a `network_cifar` model on CE(logits) + auxiliary_weight * CE(aux_logits).

    Training reports the total loss and top-1 accuracy; evaluation (on the logits alone,
    as DARTS' `infer`) reports the cross-entropy, top-1 and top-5 accuracy. Logits are cast
    to float32 before the loss, so mixed precision keeps a float32 loss; the loss is scaled
    for `LossScaleOptimizer` and divided by the replicas, whose gradients are summed.

    Args:
        network: a `networks.network_cifar` model, with or without the auxiliary head.
        auxiliary_weight: the auxiliary loss weight (0.4 in DARTS), ignored without a head.

    Call arguments:
        images: normalised [N, H, W, 3] images.
        training: whether BatchNorm uses batch statistics and drop path is active.

    Example:
    >>> trainer = AuxiliaryTrainer(network_cifar(PIBCONV, layers=2, auxiliary=True), 0.4)
    >>> trainer.compile(optimizer=TorchSGD(0.025, coupled_weight_decay=3e-4))
    >>> trainer.fit(dataset, epochs=1)

    Reference:
        Liu et al., DARTS, arXiv 1806.09055 (train.py: loss += auxiliary_weight * loss_aux).
    """

    def __init__(self, network, auxiliary_weight=0.4, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.auxiliary_weight = auxiliary_weight
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        logits = network.output[networks.LOGITS] if _has_aux(network) else network.output
        num_classes = logits.shape[-1]
        self.top5 = keras.metrics.SparseTopKCategoricalAccuracy(
            k=min(5, num_classes), name="top5_accuracy"
        )
        self.built = True  # the network is: a JAX step can take the state now

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy, self.top5]

    def call(self, images, training=None):
        return self.network(images, training=training)

    def losses_of(self, labels, outputs):
        """(total loss, logits): the batch-mean CE plus the weighted auxiliary CE."""
        if isinstance(outputs, dict):
            logits = ops.cast(outputs[networks.LOGITS], "float32")
            aux_logits = ops.cast(outputs[networks.AUX_LOGITS], "float32")
        else:
            logits, aux_logits = ops.cast(outputs, "float32"), None
        loss = _cross_entropy(labels, logits)
        if aux_logits is not None and self.auxiliary_weight:
            loss = loss + self.auxiliary_weight * _cross_entropy(labels, aux_logits)
        return loss, logits

    def train_step(self, *args):
        """TensorFlow: `(data)` -> logs. JAX: `(state, data)` -> (logs, state)."""
        if keras.backend.backend() != "tensorflow":
            return self._jax_train_step(*args)
        import tensorflow as tf  # noqa: PLC0415

        images, labels, _ = keras.utils.unpack_x_y_sample_weight(args[0])
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            loss, logits = self.losses_of(labels, self.network(images, training=True))
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss / replicas)
        gradients = tape.gradient(scaled, variables)
        if replicas > 1:
            # Keras clips each replica's gradients before it sums them. Summing first and
            # passing the mean (clipped at grad_clip / replicas, see `make_optimizer`) clips
            # the global gradient at grad_clip, as one device would.
            context = tf.distribute.get_replica_context()
            gradients = [g / replicas for g in context.all_reduce("sum", gradients)]
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        self.loss_tracker.update_state(loss, sample_weight=ops.shape(labels)[0])
        self.accuracy.update_state(labels, logits)
        from pibconv_tf import distribute  # noqa: PLC0415

        logs = {"loss": self.loss_tracker.result(), "accuracy": self.accuracy.result()}
        return distribute.reducible_logs(logs)

    def _jax_train_step(self, state, data):
        """The same step as a stateless function of the trainer's state (jitted by fit).

        The optimizer's global-norm clipping and float16 loss scaling are its own
        (`stateless_apply`); the loss is the global batch's mean (DataParallel shards it).
        """
        import jax  # noqa: PLC0415

        trainable, non_trainable, optimizer_vars, metrics_vars = state
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)

        def loss_fn(trainable_, non_trainable_):
            outputs, updated = self.stateless_call(
                trainable_, non_trainable_, images, training=True
            )
            loss, logits = self.losses_of(labels, outputs)
            return self.optimizer.scale_loss(loss), (loss, logits, updated)

        grads, (loss, logits, non_trainable) = jax.grad(loss_fn, has_aux=True)(
            trainable, non_trainable
        )
        trainable, optimizer_vars = self.optimizer.stateless_apply(optimizer_vars, grads, trainable)
        count = labels.shape[0]
        tracker_vars, accuracy_vars = self._split_metrics(metrics_vars)[:2]
        tracker_vars = self.loss_tracker.stateless_update_state(
            tracker_vars, loss, sample_weight=count
        )
        accuracy_vars = self.accuracy.stateless_update_state(accuracy_vars, labels, logits)
        top5_vars = self._split_metrics(metrics_vars)[2]
        logs = {
            "loss": self.loss_tracker.stateless_result(tracker_vars),
            "accuracy": self.accuracy.stateless_result(accuracy_vars),
        }
        metrics_vars = [*tracker_vars, *accuracy_vars, *top5_vars]
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

    def _split_metrics(self, values):
        parts, offset = [], 0
        for metric in self.metrics:
            parts.append(list(values[offset : offset + len(metric.variables)]))
            offset += len(metric.variables)
        return parts

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if keras.backend.backend() == "tensorflow" and iterator is not None:
            from pibconv_tf import distribute  # noqa: PLC0415

            iterator, data_batch = None, distribute.first_local_batch(self, iterator)
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def sync_replicas(self):
        """The BatchNorm moving statistics of the network: their mean over the replicas."""
        if keras.backend.backend() == "tensorflow":
            from pibconv_tf import distribute  # noqa: PLC0415

            distribute.reconcile_moving_statistics(self.network)

    def test_step(self, *args):
        if keras.backend.backend() != "tensorflow":
            return self._jax_test_step(*args)
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(args[0])
        outputs = self.network(images, training=False)
        logits = outputs[networks.LOGITS] if isinstance(outputs, dict) else outputs
        logits = ops.cast(logits, "float32")
        loss = _cross_entropy(labels, logits)
        self.loss_tracker.update_state(loss, sample_weight=ops.shape(labels)[0])
        self.accuracy.update_state(labels, logits)
        self.top5.update_state(labels, logits)
        from pibconv_tf import distribute  # noqa: PLC0415

        return distribute.reducible_logs({metric.name: metric.result() for metric in self.metrics})

    def _jax_test_step(self, state, data):
        trainable, non_trainable, metrics_vars = state
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        outputs, non_trainable = self.stateless_call(
            trainable, non_trainable, images, training=False
        )
        logits = outputs[networks.LOGITS] if isinstance(outputs, dict) else outputs
        logits = ops.cast(logits, "float32")
        loss = _cross_entropy(labels, logits)
        tracker, accuracy, top5 = self._split_metrics(metrics_vars)
        tracker = self.loss_tracker.stateless_update_state(
            tracker, loss, sample_weight=labels.shape[0]
        )
        accuracy = self.accuracy.stateless_update_state(accuracy, labels, logits)
        top5 = self.top5.stateless_update_state(top5, labels, logits)
        logs = {
            metric.name: metric.stateless_result(values)
            for metric, values in zip(self.metrics, (tracker, accuracy, top5), strict=True)
        }
        return logs, (trainable, non_trainable, [*tracker, *accuracy, *top5])

    def get_config(self):
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "auxiliary_weight": self.auxiliary_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)


def _replicas():
    """Replicas of the current tf.distribute strategy (1 on other backends: JAX shards)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf  # noqa: PLC0415

    return tf.distribute.get_strategy().num_replicas_in_sync


def _has_aux(network):
    return isinstance(network.output, dict)


def _cross_entropy(labels, logits):
    return ops.mean(ops.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def make_optimizer(config, replicas=1):
    """`optim.TorchSGD` with the config's hyper-parameters; float16 gets loss scaling.

    The learning rate is a variable that `EpochSchedule` sets at each epoch's start from
    `lr_schedule(config)` (DARTS steps its cosine per epoch), so the schedule depends on the
    epoch alone, not on step counts (which loss scaling's skipped steps would shift). With
    several replicas the clip norm is divided by their number: each replica then clips the
    all-reduced gradient divided by the replicas (see `AuxiliaryTrainer.train_step`).
    """
    optimizer = optim.TorchSGD(
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        coupled_weight_decay=config.weight_decay,
        global_clipnorm=config.grad_clip / replicas if config.grad_clip else None,
    )
    if config.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def lr_schedule(config):
    return optim.EpochCosineDecay(
        config.learning_rate, config.epochs, steps_per_epoch=1, minimum=config.min_learning_rate
    )


def drop_path_rate(config, epoch):
    """DARTS' linear ramp: drop_path_prob * epoch / epochs, for the 0-based `epoch`."""
    return config.drop_path_prob * epoch / config.epochs


def build_trainer(config, genotype, num_classes, image_size):
    """The network (with the auxiliary head when its weight is > 0), its trainer and
    optimizer, compiled and built; call inside the strategy scope and dtype policy."""
    with numerics.synchronized_batch_norm(config.sync_batch_norm):
        network = networks.network_cifar(
            genotype,
            num_classes=num_classes,
            init_channels=config.init_channels,
            layers=config.layers,
            auxiliary=config.auxiliary_weight > 0,
            image_size=image_size,
            seed=config.seed,
        )
    trainer = AuxiliaryTrainer(network, config.auxiliary_weight)
    optimizer = make_optimizer(config, _replicas())
    trainer.compile(optimizer=optimizer, jit_compile=numerics.step_jit_compile(config.jit_compile))
    # Built now so that a checkpoint restores the momentum buffers instead of deferring.
    optimizer.build(network.trainable_variables)
    return network, trainer, optimizer
