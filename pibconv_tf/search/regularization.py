"""beta-DARTS' Beta-Decay regularisation of the architecture, against skip-connection collapse.

The architecture loss gains lambda * L_beta, with

    L_beta = mean over the rows (edges) of both alpha matrices of logsumexp(alpha_row),

which keeps the softmaxed alphas from growing large and peaked (the collapse onto parameter-
free operations). Its gradient is known in closed form: d L_beta / d alpha_row =
softmax(alpha_row) / rows, where rows counts the rows of both matrices. L_beta does not
depend on the weights, so it adds this gradient to DARTS' architecture gradient in both
orders (the unrolled w' and the Hessian-vector product are unchanged); under a
tf.distribute strategy it is added once, after the replicas' gradients are summed.

lambda grows linearly over the search: lambda(e) = lambda_max * e / epochs at (0-based)
epoch e (`BetaDecaySchedule`). The authors' code sets lambda = 50 * e / 100 in its 50-epoch
search, which is `--beta_regularization=25` here; it applies the term to the first order
only (its unrolled path leaves it out), where this module applies it to both.

Backend-agnostic (keras.ops): the TensorFlow and the JAX search steps call the same code.

Reference:
    Ye et al., beta-DARTS: Beta-Decay Regularization for Differentiable Architecture Search,
    CVPR 2022, arXiv 2203.01665 (Eq. 8; github Sunshine-Ye/Beta-DARTS,
    `optimizers/darts/architect.py`).
"""

import keras
from keras import ops


def _is_alpha(variable):
    """An alpha matrix [num_edges, num_ops], not one of PC-DARTS' edge betas [num_edges]."""
    return len(variable.shape) == 2


def beta_decay_loss(alphas):
    """L_beta of the alpha matrices `alphas` ([num_edges, num_ops] each)."""
    rows = [ops.logsumexp(ops.cast(a, "float32"), axis=-1) for a in alphas if _is_alpha(a)]
    return ops.mean(ops.concatenate(rows, axis=0))


def add_beta_decay(alpha_grads, alphas, coefficient):
    """`alpha_grads` + coefficient * d L_beta / d alphas (softmax(alpha) / rows).

    Only the alpha matrices (rank 2) are regularised: PC-DARTS' edge betas (rank 1), which
    may follow them in the architecture parameters, keep their gradients.
    """
    rows = sum(int(a.shape[0]) for a in alphas if _is_alpha(a))
    scale = ops.cast(coefficient, "float32") / float(rows)
    return [
        g + ops.cast(scale * ops.softmax(ops.cast(a, "float32"), axis=-1), g.dtype)
        if _is_alpha(a)
        else g
        for g, a in zip(alpha_grads, alphas, strict=True)
    ]


def coefficient_at(maximum, epoch, epochs):
    """lambda(e) = maximum * e / epochs: 0 at the first epoch, rising linearly."""
    return float(maximum) * float(epoch) / float(epochs)


class BetaDecaySchedule(keras.callbacks.Callback):
    """Sets the search trainer's `beta_coefficient` at each epoch's start: lambda(epoch).

    Args:
        maximum: lambda_max (`--beta_regularization`).
        epochs: the search's epochs (the ramp's length).
    """

    def __init__(self, maximum, epochs):
        super().__init__()
        self.maximum = maximum
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.model.beta_coefficient.assign(coefficient_at(self.maximum, epoch, self.epochs))
