"""The search trainer: one Keras train step with DARTS' two alternating updates.

Each step takes `((x_train, y_train), (x_val, y_val))` and
1. updates the alphas with the architecture gradient on the validation batch (`Architect`,
   first or second order) and the architecture optimiser (`TorchAdam` in DARTS);
2. updates the weights with the gradient of the training loss, clipped to a global norm
   (PyTorch's `clip_grad_norm_`), and the weight optimiser (`TorchSGD` in DARTS).

`keras.Model.fit` runs the step inside a tf.function (optionally XLA-compiled) under the
model's tf.distribute strategy and brings callbacks and the progress bar.

Distribution: losses are this replica's share of the global-batch mean, and every gradient
is summed over the replicas *before* it is used (the norm for clipping, the unrolled weights
of the second order). Keras optimisers sum the gradients they are given once more, so the
already-summed gradients are handed to them divided by the number of replicas.
"""

import keras
import tensorflow as tf
from keras import ops

from pibconv_tf.model.search_network import set_op_executor
from pibconv_tf.search import architect as architect_lib
from pibconv_tf.search import loss_scale as loss_scale_lib
from pibconv_tf.search.shared_trace import SharedTraces


def clip_by_global_norm(grads, max_norm):
    """PyTorch's `clip_grad_norm_`: scale by max_norm / (norm + 1e-6) when that is below 1."""
    norm = architect_lib.global_norm(grads)
    scale = tf.minimum(1.0, max_norm / (norm + 1e-6))
    return [g * tf.cast(scale, g.dtype) for g in grads], norm


class SearchTrainer(keras.Model):
    """Trains a `SearchNetwork`'s weights and architecture with DARTS' alternating updates.

    Args:
        network: a built `SearchNetwork`.
        order: "first" or "second" (the one-step unrolled architecture gradient).
        grad_clip: global norm the weight gradient is clipped to (5 in DARTS).
        share_traces: trace each mixed-operation configuration once (`SharedTraces`) instead
            of every edge: same numbers, a much smaller graph.
        loss_scaling: scale the losses dynamically (`DynamicLossScale`); None turns it on
            under the mixed_float16 policy.

    Call arguments:
        inputs: normalised images; returns the network's logits.
        training: passed to the network.

    Example:
    ```python
    trainer = SearchTrainer(network, order="second")
    trainer.compile(
        weight_optimizer=optim.TorchSGD(schedule, 0.9, coupled_weight_decay=3e-4),
        arch_optimizer=TorchAdam(3e-4, 0.5, 0.999, coupled_weight_decay=1e-3),
    )
    trainer.fit(search_dataset, epochs=50)
    ```

    Reference:
        Liu et al., DARTS, arXiv 1806.09055, Alg. 1.
    """

    def __init__(
        self,
        network,
        order="first",
        grad_clip=5.0,
        share_traces=True,
        loss_scaling=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "search_trainer")
        super().__init__(**kwargs)
        self.network = network
        self.order = order
        self.grad_clip = grad_clip
        self.share_traces = share_traces
        set_op_executor(network, SharedTraces() if share_traces else None)
        if loss_scaling is None:
            loss_scaling = keras.mixed_precision.global_policy().name == "mixed_float16"
        self.loss_scale = loss_scale_lib.DynamicLossScale() if loss_scaling else None
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.val_loss_tracker = keras.metrics.Mean(name="val_loss")
        self.val_accuracy = keras.metrics.SparseCategoricalAccuracy(name="val_accuracy")
        self.grad_norm = keras.metrics.Mean(name="grad_norm")
        self.architect = None
        self.arch_optimizer = None
        self.built = True

    def compile(self, weight_optimizer, arch_optimizer, loss=None, jit_compile=False, **kwargs):
        """Sets both optimisers (built on their variables here) and the per-example loss.

        Args:
            weight_optimizer: optimiser of `network.weight_parameters()`; the second order
                reads its `learning_rate`, `momentum` and `coupled_weight_decay`, and its
                `momentum_buffer(variable)` when it has one (`optim.TorchSGD`).
            arch_optimizer: optimiser of `network.arch_parameters()`.
            loss: (labels, logits) -> per-example losses; sparse softmax cross-entropy on
                logits by default.
            jit_compile: compile the train step with XLA.
        """
        super().compile(optimizer=weight_optimizer, jit_compile=jit_compile, **kwargs)
        self.arch_optimizer = arch_optimizer
        self.per_example_loss = loss or _cross_entropy
        weight_optimizer.build(self.network.weight_parameters())
        arch_optimizer.build(self.network.arch_parameters())
        self.architect = architect_lib.Architect(
            self.network,
            self._replica_loss,
            order=self.order,
            momentum=getattr(weight_optimizer, "momentum", 0.0),
            weight_decay=getattr(weight_optimizer, "coupled_weight_decay", 0.0),
            loss_scale=self.loss_scale,
        )

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.accuracy,
            self.val_loss_tracker,
            self.val_accuracy,
            self.grad_norm,
        ]

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _replica_loss(self, labels, logits):
        """This replica's share of the global-batch mean loss."""
        per_example = ops.cast(self.per_example_loss(labels, logits), "float32")
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = ops.cast(ops.shape(per_example)[0] * replicas, "float32")
        return ops.sum(per_example) / global_batch

    def _momentum_buffers(self):
        if self.order == "first" or not hasattr(self.optimizer, "momentum_buffer"):
            return None
        return [self.optimizer.momentum_buffer(v) for v in self.network.weight_parameters()]

    def train_step(self, data):
        train_batch, val_batch = data
        xi = self.optimizer.learning_rate
        alpha_grads, _, val_logits = self.architect.gradients(
            train_batch, val_batch, xi, self._momentum_buffers()
        )
        alphas_finite = self._update(
            self.arch_optimizer, alpha_grads, self.network.arch_parameters()
        )

        x, y = train_batch
        weights = self.architect.weights
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(weights)
            logits = self.network(x, training=True)
            loss = self._replica_loss(y, logits)
        grads = architect_lib.gradient(tape, loss, weights, self.loss_scale)
        grads, norm = clip_by_global_norm(grads, self.grad_clip)
        weights_finite = self._update(self.optimizer, grads, self.network.weight_parameters())
        if self.loss_scale is not None:
            self.loss_scale.update(tf.logical_and(alphas_finite, weights_finite))

        self.loss_tracker.update_state(self.per_example_loss(y, logits))
        self.accuracy.update_state(y, logits)
        # A skipped float16 step (overflowed gradients) has no meaningful validation loss
        # (the unrolled weights are not finite) or gradient norm: leave them out.
        val_y = val_batch[1]
        _track(self.val_loss_tracker, alphas_finite, self.per_example_loss(val_y, val_logits))
        _track(self.val_accuracy, alphas_finite, val_y, val_logits)
        _track(self.grad_norm, weights_finite, norm)
        return {metric.name: metric.result() for metric in self.metrics}

    def _update(self, optimizer, grads, variables):
        """Applies `grads`; with a loss scale, only if they are all finite (returned)."""
        if self.loss_scale is None:
            _apply(optimizer, grads, variables)
            return None
        finite = self.loss_scale.all_finite(grads)
        loss_scale_lib.apply_if_finite(finite, lambda: _apply(optimizer, grads, variables))
        return finite

    def test_step(self, data):
        x, y = data
        logits = self.network(x, training=False)
        self.val_loss_tracker.update_state(self.per_example_loss(y, logits))
        self.val_accuracy.update_state(y, logits)
        return {m.name: m.result() for m in (self.val_loss_tracker, self.val_accuracy)}


def _cross_entropy(labels, logits):
    return keras.losses.sparse_categorical_crossentropy(
        labels, ops.cast(logits, "float32"), from_logits=True
    )


def _track(metric, finite, *args):
    if finite is None:
        metric.update_state(*args)
        return
    weight = tf.cast(finite, tf.float32)
    args = [tf.where(finite, a, tf.zeros_like(a)) for a in args]
    metric.update_state(*args, sample_weight=weight * tf.ones_like(args[0], tf.float32))


def _apply(optimizer, summed_grads, variables):
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        # Keras sums the gradients over the replicas again; they are already summed.
        summed_grads = [g / replicas for g in summed_grads]
    optimizer.apply(summed_grads, variables)
