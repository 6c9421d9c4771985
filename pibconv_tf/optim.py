"""Optimisers with PyTorch's update rules, which DARTS' hyper-parameters were tuned for.

`TorchSGD` trains the weights (search and evaluation), `TorchAdam` the search's alphas,
`EpochCosineDecay` is DARTS' per-epoch cosine schedule.

Keras' SGD folds the learning rate into the momentum buffer and its `weight_decay` is
decoupled (AdamW style); PyTorch adds the weight decay to the gradient *after* gradient
clipping and keeps an lr-free momentum buffer. The difference is a factor of 1/(1-momentum)
on the effective decay, so we follow PyTorch, and expose the buffer that DARTS' second-order
architecture step reads.
"""

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="pibconv_tf")
class TorchSGD(keras.optimizers.Optimizer):
    """SGD with momentum and coupled (L2) weight decay, as `torch.optim.SGD`.

    d = g + weight_decay * w;  buf = momentum * buf + d (buf = d at the first step);
    w = w - lr * buf. Gradient clipping (`global_clipnorm`) happens before d is formed,
    as `clip_grad_norm_` before `optimizer.step()` in DARTS.

    Args:
        learning_rate: float or a `keras.optimizers.schedules.LearningRateSchedule`.
        momentum: momentum factor (0.9 in DARTS).
        coupled_weight_decay: L2 coefficient added to the gradient (3e-4 in DARTS).
        **kwargs: base `keras.optimizers.Optimizer` arguments (`global_clipnorm`, `name`).
    """

    def __init__(
        self,
        learning_rate=0.025,
        momentum=0.9,
        coupled_weight_decay=0.0,
        name="torch_sgd",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum
        self.coupled_weight_decay = coupled_weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentum_buffers = [
            self.add_variable_from_reference(variable, "momentum_buffer") for variable in variables
        ]

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if keras.backend.backend() == "tensorflow" and not _tf_has_strategy():
            # Outside a tf.distribute strategy there is no per-replica update to route
            # through; Keras' per-variable `extended.update` costs ~3 ms of tracing each.
            _tf_sgd_step(self, grads, trainable_variables, learning_rate)
            return
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            gradient = gradient + self.coupled_weight_decay * variable
        buffer = self.momentum_buffers[self._get_variable_index(variable)]
        if keras.backend.backend() == "tensorflow":
            _tf_momentum_update(variable, buffer, lr, gradient, self.momentum)
            return
        # The buffer starts at zero, so the first step sets it to the gradient, as PyTorch.
        new_buffer = self.momentum * buffer + gradient
        self.assign(buffer, new_buffer)
        self.assign_sub(variable, lr * new_buffer)

    def momentum_buffer(self, variable):
        """The PyTorch-convention momentum buffer of `variable` (zeros before the first step)."""
        return self.momentum_buffers[self._get_variable_index(variable)]

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "coupled_weight_decay": self.coupled_weight_decay,
        }


def _tf_has_strategy():
    import tensorflow as tf  # noqa: PLC0415

    return tf.distribute.has_strategy()


def _tf_sgd_step(optimizer, grads, variables, learning_rate):
    """`TorchSGD.update_step` over all variables: the weight decay d = g + wd * w computed
    once per shape of variable (`search.grouped`: stacked, the same arithmetic), then one
    momentum kernel per variable."""
    import tensorflow as tf  # noqa: PLC0415

    from pibconv_tf.search import grouped  # noqa: PLC0415

    grads = [tf.cast(g, v.dtype) for g, v in zip(grads, variables, strict=True)]
    if optimizer.coupled_weight_decay:
        decay = optimizer.coupled_weight_decay
        values = [tf.convert_to_tensor(v) for v in variables]
        grads = grouped.ShapeGroups(values).map(
            lambda g, w: g + tf.cast(decay, w.dtype) * w, grads, values
        )
    constants = {}
    for gradient, variable in zip(grads, variables, strict=True):
        dtype = variable.dtype
        if dtype not in constants:
            constants[dtype] = [tf.cast(v, dtype) for v in (learning_rate, optimizer.momentum)]
        lr, momentum = constants[dtype]
        buffer = optimizer.momentum_buffers[optimizer._get_variable_index(variable)]
        _tf_momentum_update(variable, buffer, lr, gradient, momentum)


def _tf_momentum_update(variable, buffer, lr, gradient, momentum):
    """buf = momentum * buf + d; w -= lr * buf, as one TensorFlow kernel.

    The same arithmetic as the generic path below it in `TorchSGD.update_step`, in one
    graph node instead of five (reads, the two products, both assignments): the search
    network has ~2,000 weight tensors, so this takes ~10^4 nodes out of every search step's
    graph, which TensorFlow would trace, hold and schedule at each step.
    """
    import tensorflow as tf  # noqa: PLC0415  (TensorFlow's kernel; JAX takes the generic path)

    variable, buffer = (v.value if isinstance(v, keras.Variable) else v for v in (variable, buffer))
    tf.raw_ops.ResourceApplyMomentum(
        var=variable.handle,
        accum=buffer.handle,
        lr=lr,
        grad=gradient,
        momentum=tf.cast(momentum, variable.dtype),
    )


@keras.saving.register_keras_serializable(package="pibconv_tf")
class EpochCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """DARTS' `CosineAnnealingLR` stepped once per epoch: constant within an epoch.

    lr(epoch) = minimum + (initial - minimum) * (1 + cos(pi * epoch / epochs)) / 2, with
    epoch = step // steps_per_epoch.

    Args:
        initial_learning_rate: lr of the first epoch.
        epochs: the cosine's period in epochs.
        steps_per_epoch: optimizer steps per epoch.
        minimum: the final learning rate (0.001 in DARTS' search, 0 in its evaluation).
    """

    def __init__(self, initial_learning_rate, epochs, steps_per_epoch, minimum=0.0):
        self.initial_learning_rate = initial_learning_rate
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.minimum = minimum

    def __call__(self, step):
        epoch = ops.floor_divide(ops.cast(step, "float32"), float(self.steps_per_epoch))
        return self.at_epoch(epoch)

    def at_epoch(self, epoch):
        """The learning rate of (0-based) `epoch`; works on Python numbers and tensors."""
        progress = ops.minimum(ops.cast(epoch, "float32") / float(self.epochs), 1.0)
        cosine = 0.5 * (1.0 + ops.cos(np.pi * progress))
        return self.minimum + (self.initial_learning_rate - self.minimum) * cosine

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "minimum": self.minimum,
        }


@keras.saving.register_keras_serializable(package="pibconv_tf")
class TorchAdam(keras.optimizers.Optimizer):
    """Adam as `torch.optim.Adam` (coupled L2 weight decay, epsilon after bias correction).

    g = grad + weight_decay * w;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    w = w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + epsilon).

    Args:
        learning_rate: float or schedule (3e-4 for DARTS' alphas).
        beta_1: 0.5 in DARTS.
        beta_2: 0.999.
        epsilon: 1e-8 (PyTorch's default).
        coupled_weight_decay: L2 coefficient added to the gradient (1e-3 in DARTS).
        **kwargs: base `keras.optimizers.Optimizer` arguments (`name`, ...).

    Example:
    >>> optimizer = TorchAdam(3e-4, beta_1=0.5, coupled_weight_decay=1e-3)

    Reference:
        Kingma and Ba, arXiv 1412.6980; Liu et al., DARTS, arXiv 1806.09055 (Sec. 3.1.2).
    """

    def __init__(
        self,
        learning_rate=3e-4,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        coupled_weight_decay=0.0,
        name="torch_adam",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.coupled_weight_decay = coupled_weight_decay

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.first_moments = [self.add_variable_from_reference(v, "m") for v in variables]
        self.second_moments = [self.add_variable_from_reference(v, "v") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            gradient = gradient + self.coupled_weight_decay * variable
        step = ops.cast(self.iterations + 1, variable.dtype)
        index = self._get_variable_index(variable)
        m, v = self.first_moments[index], self.second_moments[index]
        new_m = self.beta_1 * m + (1.0 - self.beta_1) * gradient
        new_v = self.beta_2 * v + (1.0 - self.beta_2) * ops.square(gradient)
        self.assign(m, new_m)
        self.assign(v, new_v)
        m_hat = new_m / (1.0 - ops.power(self.beta_1, step))
        v_hat = new_v / (1.0 - ops.power(self.beta_2, step))
        self.assign_sub(variable, lr * m_hat / (ops.sqrt(v_hat) + self.epsilon))

    def get_config(self):
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "coupled_weight_decay": self.coupled_weight_decay,
        }


class EpochLearningRate(keras.callbacks.Callback):
    """Sets the optimizer's learning rate at each epoch's start from `schedule.at_epoch`.

    DARTS steps its cosine once per epoch; setting it by epoch (rather than deriving it from
    the optimizer's step count) keeps it on the epoch boundaries when float16 loss scaling
    skips steps, and the logged rate is the rate used.

    Args:
        schedule: an `EpochCosineDecay` (or anything with `at_epoch(epoch)`).
        optimizer: the optimizer to set (default: the model's).
    """

    def __init__(self, schedule, optimizer=None):
        super().__init__()
        self.schedule = schedule
        self.optimizer = optimizer

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.optimizer or self.model.optimizer
        optimizer.learning_rate = float(self.schedule.at_epoch(epoch))
