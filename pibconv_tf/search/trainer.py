"""The search trainer: one Keras train step with DARTS' two alternating updates.

Each step takes `((x_train, y_train), (x_val, y_val))` and
1. updates the alphas with the architecture gradient on the validation batch (`Architect`,
   first or second order) and the architecture optimiser (`TorchAdam` in DARTS);
2. updates the weights with the gradient of the training loss, clipped to a global norm
   (PyTorch's `clip_grad_norm_`), and the weight optimiser (`TorchSGD` in DARTS).

`keras.Model.fit` runs the step and brings callbacks and the progress bar: on TensorFlow
inside a tf.function under the model's tf.distribute strategy (`search.tf_step`), on JAX as
a jitted, stateless function of the model's state (`search.jax_step`; several devices with
`keras.distribution.DataParallel`). Both compute the same updates.
"""

import keras
from keras import ops

from pibconv_tf.errors import UserInputError
from pibconv_tf.model.search_network import set_op_executor


class SearchTrainer(keras.Model):
    """Trains a `SearchNetwork`'s weights and architecture with DARTS' alternating updates.

    Args:
        network: a built `SearchNetwork`.
        order: "first" or "second" (the one-step unrolled architecture gradient).
        grad_clip: global norm the weight gradient is clipped to (5 in DARTS).
        share_traces: trace each mixed-operation configuration once (`SharedTraces`) instead
            of every edge: same numbers, a much smaller graph.
        inline_traces: let TensorFlow inline the shared traces into the step's graph.
            False (the default) runs them as function calls: measured on the paper's
            network, a first step in seconds rather than minutes, less memory and the same
            or faster steps (`shared_trace`, docs/performance.md).
        recompute: recompute each mixed operation in the backward pass instead of holding
            its activations (gradient checkpointing; TensorFlow, with `share_traces`).
            None (the default) turns it on wherever it is offered: on the paper's network
            ~8 instead of ~150 MB per image and faster steps (docs/performance.md).
        loss_scaling: scale the losses dynamically (`DynamicLossScale`); None turns it on
            under the mixed_float16 policy (TensorFlow only).
        hessian: the second order's Hessian-vector product: "finite_difference" (DARTS'
            central difference) or "exact" (forward-over-reverse; JAX only).
        beta_regularization: None (off), or the starting value of `beta_coefficient`, the
            lambda of beta-DARTS' Beta-Decay term added to the architecture gradient
            (`search.regularization`; `BetaDecaySchedule` ramps it per epoch).

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
        inline_traces=False,
        recompute=None,
        loss_scaling=None,
        hessian="finite_difference",
        beta_regularization=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "search_trainer")
        super().__init__(**kwargs)
        if hessian not in ("finite_difference", "exact"):
            raise UserInputError(
                f"--hessian={hessian!r} is not valid; expected finite_difference or exact."
            )
        if hessian == "exact" and keras.backend.backend() != "jax":
            raise UserInputError(
                "--hessian=exact (forward-over-reverse differentiation) runs on JAX; on "
                "TensorFlow the second order uses DARTS' finite difference."
            )
        self.network = network
        self.order = order
        self.hessian = hessian
        self.grad_clip = grad_clip
        self.share_traces = share_traces
        tensorflow = keras.backend.backend() == "tensorflow"
        if recompute is None:
            recompute = tensorflow and share_traces
        if recompute and not (tensorflow and share_traces):
            raise UserInputError(
                "--recompute runs through TensorFlow's shared mixed-operation traces; it is "
                "not offered on JAX or with --sync_batch_norm."
            )
        if tensorflow:
            from pibconv_tf.search.shared_trace import SharedTraces  # noqa: PLC0415

            executor = SharedTraces(inline_traces, recompute) if share_traces else None
            set_op_executor(network, executor)
        # What the step runs with (inlining and recomputation apply to the shared traces).
        self.inline_traces = bool(inline_traces and tensorflow and share_traces)
        self.recompute = bool(recompute)
        if loss_scaling is None:
            loss_scaling = keras.mixed_precision.global_policy().name == "mixed_float16"
        self.loss_scale = None
        if loss_scaling:
            if not tensorflow:
                raise UserInputError(
                    "mixed_float16 search needs TensorFlow (loss scaling of both updates); "
                    "on JAX use --mixed_precision=mixed_bfloat16."
                )
            from pibconv_tf.search import loss_scale as loss_scale_lib  # noqa: PLC0415

            self.loss_scale = loss_scale_lib.DynamicLossScale()
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.val_loss_tracker = keras.metrics.Mean(name="val_loss")
        self.val_accuracy = keras.metrics.SparseCategoricalAccuracy(name="val_accuracy")
        self.grad_norm = keras.metrics.Mean(name="grad_norm")
        self.architect = None
        self.arch_optimizer = None
        # A variable, so that a schedule can change it between epochs without a new trace
        # (on JAX it travels in the step's state with the other non-trainable variables).
        self.beta_coefficient = None
        if beta_regularization is not None:
            self.beta_coefficient = keras.Variable(
                float(beta_regularization),
                trainable=False,
                dtype="float32",
                name="beta_coefficient",
            )
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
        if keras.backend.backend() == "tensorflow":
            from pibconv_tf.search import tf_step  # noqa: PLC0415

            self.architect = tf_step.make_architect(self)
        else:
            # Held by the trainer, the architecture optimiser's variables are part of the
            # state a JAX fit passes to the jitted step (Keras passes only `optimizer`'s).
            self.arch_optimizer_variables = list(arch_optimizer.variables)

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

    def train_step(self, *args):
        """TensorFlow: `(data)` -> logs. JAX: `(state, data)` -> (logs, state)."""
        if keras.backend.backend() == "tensorflow":
            from pibconv_tf import distribute  # noqa: PLC0415
            from pibconv_tf.search import tf_step  # noqa: PLC0415

            return distribute.reducible_logs(tf_step.train_step(self, *args))
        from pibconv_tf.search import jax_step  # noqa: PLC0415

        return jax_step.train_step(self, *args)

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
            from pibconv_tf.search import jax_step  # noqa: PLC0415

            return jax_step.test_step(self, *args)
        x, y = args[0]
        logits = self.network(x, training=False)
        self.val_loss_tracker.update_state(self.per_example_loss(y, logits))
        self.val_accuracy.update_state(y, logits)
        from pibconv_tf import distribute  # noqa: PLC0415

        logs = {m.name: m.result() for m in (self.val_loss_tracker, self.val_accuracy)}
        return distribute.reducible_logs(logs)


def _cross_entropy(labels, logits):
    return keras.losses.sparse_categorical_crossentropy(
        labels, ops.cast(logits, "float32"), from_logits=True
    )
