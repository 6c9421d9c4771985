"""Adam with PyTorch's update rule, the architecture optimiser of DARTS.

Keras' Adam differs from `torch.optim.Adam` in two places that matter for the tiny
architecture gradients of DARTS: its `weight_decay` is decoupled (AdamW), where DARTS adds
1e-3 * alpha to the gradient, and its epsilon is added to sqrt(v) before bias correction
(epsilon-hat), which on the first steps with beta_2 = 0.999 makes the effective epsilon ~30x
larger than PyTorch's.
"""

import keras
from keras import ops


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
