"""Optimisers with PyTorch's update rules, which DARTS' hyper-parameters were tuned for.

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

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            gradient = gradient + self.coupled_weight_decay * variable
        buffer = self.momentum_buffers[self._get_variable_index(variable)]
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
