"""The JAX search step: DARTS' two updates as one stateless function of the model's state.

Keras' JAX trainer jits `SearchTrainer.train_step(state, data)`, state being the trainer's
(trainable, non-trainable, optimizer, metrics) variable values; the architecture
optimiser's variables travel among the non-trainable ones. The maths are those of
`search.architect` and `search.tf_step`, in the same order, so the same weights and batches
give the same alphas and losses on both backends:

1. The architecture gradient on the validation batch: first order, grad_alpha L_val(w); or
   DARTS' second order, grad_alpha L_val(w') - xi * H v with w' = w - xi (mu m + g + wd w)
   and H v = d/de grad_alpha L_train(w + e v): by DARTS' central difference (eps = 0.01 /
   ||v||) or, with `hessian="exact"`, exactly by forward-over-reverse differentiation
   (`jax.jvp` of the gradient). The first-order validation pass and the pass that gives g
   update the BatchNorm statistics; the passes at w' and w +- eps v do not (as on
   TensorFlow, where they run in a `StatelessScope`).
   With `beta_regularization`, beta-DARTS' Beta-Decay gradient is added
   (`search.regularization`), its coefficient read from the state.
2. TorchAdam on the alphas; then the training loss at the new alphas, its gradient clipped
   to a global norm (PyTorch's `clip_grad_norm_`), and TorchSGD on the weights.

Only keras, jax and numpy are imported (no TensorFlow), so the step runs where JAX alone is
installed. Losses are means over the global batch: under `keras.distribution.DataParallel`
jit's sharding makes them so.

Reference:
    Liu et al., DARTS, arXiv 1806.09055, Eq. 6-8.
"""

import jax
import jax.numpy as jnp
import keras

from pibconv_tf.search import regularization

HESSIANS = ("finite_difference", "exact")


class _Layout:
    """Where each group of variables sits in the trainer's state lists."""

    def __init__(self, trainer):
        trainable = [id(v) for v in trainer.trainable_variables]
        non_trainable = [id(v) for v in trainer.non_trainable_variables]
        self.alphas = [trainable.index(id(v)) for v in trainer.network.arch_parameters()]
        optimizer = trainer.optimizer
        # The weights in the order the weight optimiser was built on (`SearchTrainer.compile`).
        self.weights = [trainable.index(id(v)) for v in trainer.network.weight_parameters()]
        self.arch_slots = [non_trainable.index(id(v)) for v in trainer.arch_optimizer.variables]
        beta = trainer.beta_coefficient
        self.beta = None if beta is None else non_trainable.index(id(beta))
        optimizer_vars = [id(v) for v in optimizer.variables]
        buffers = getattr(optimizer, "momentum_buffers", None)
        self.momentum = None if buffers is None else [optimizer_vars.index(id(b)) for b in buffers]


def _layout(trainer):
    layout = getattr(trainer, "_jax_layout", None)
    if layout is None:
        layout = trainer._jax_layout = _Layout(trainer)
    return layout


def _put(values, indices, parts):
    values = list(values)
    for index, part in zip(indices, parts, strict=True):
        values[index] = part
    return values


def _take(values, indices):
    return [values[index] for index in indices]


def _mean_loss(trainer, labels, logits):
    return jnp.mean(trainer.per_example_loss(labels, logits).astype("float32"))


def _global_norm(tensors):
    return jnp.sqrt(sum(jnp.sum(jnp.square(t.astype("float32"))) for t in tensors))


def train_step(trainer, state, data):
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    (x_train, y_train), (x_val, y_val) = data
    layout = _layout(trainer)
    weights, alphas = _take(trainable, layout.weights), _take(trainable, layout.alphas)

    def loss(weights_, alphas_, non_trainable_, x, y):
        values = _put(_put(trainable, layout.weights, weights_), layout.alphas, alphas_)
        logits, updated = trainer.stateless_call(values, non_trainable_, x, training=True)
        return _mean_loss(trainer, y, logits), (logits, updated)

    grad_alphas = jax.value_and_grad(loss, argnums=1, has_aux=True)
    if trainer.order == "first":
        (_, (val_logits, non_trainable)), alpha_grads = grad_alphas(
            weights, alphas, non_trainable, x_val, y_val
        )
    else:
        alpha_grads, val_logits, non_trainable = _second_order(
            trainer, layout, loss, weights, alphas, non_trainable, optimizer_vars, data
        )
    if layout.beta is not None:
        alpha_grads = regularization.add_beta_decay(alpha_grads, alphas, non_trainable[layout.beta])
    arch_slots = _take(non_trainable, layout.arch_slots)
    alphas, arch_slots = trainer.arch_optimizer.stateless_apply(arch_slots, alpha_grads, alphas)
    non_trainable = _put(non_trainable, layout.arch_slots, arch_slots)

    (_, (logits, non_trainable)), weight_grads = jax.value_and_grad(loss, has_aux=True)(
        weights, alphas, non_trainable, x_train, y_train
    )
    norm = _global_norm(weight_grads)
    scale = jnp.minimum(1.0, trainer.grad_clip / (norm + 1e-6))
    weight_grads = [g * scale.astype(g.dtype) for g in weight_grads]
    weights, optimizer_vars = trainer.optimizer.stateless_apply(
        optimizer_vars, weight_grads, weights
    )
    trainable = _put(_put(trainable, layout.weights, weights), layout.alphas, alphas)

    metrics_vars, logs = _update_metrics(
        trainer,
        metrics_vars,
        (trainer.per_example_loss(y_train, logits),),
        (y_train, logits),
        (trainer.per_example_loss(y_val, val_logits),),
        (y_val, val_logits),
        (norm,),
    )
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)


def _second_order(trainer, layout, loss, weights, alphas, non_trainable, optimizer_vars, data):
    (x_train, y_train), (x_val, y_val) = data
    xi = _learning_rate(trainer.optimizer, optimizer_vars)
    mu = getattr(trainer.optimizer, "momentum", 0.0)
    wd = getattr(trainer.optimizer, "coupled_weight_decay", 0.0)
    grad_weights = jax.grad(loss, argnums=0, has_aux=True)
    # g at w (its pass updates the BatchNorm statistics), then one virtual SGD step.
    train_grads, (_, non_trainable) = grad_weights(weights, alphas, non_trainable, x_train, y_train)
    buffers = [None] * len(weights)
    if layout.momentum is not None:
        buffers = _take(optimizer_vars, layout.momentum)
    unrolled = [
        w - xi.astype(w.dtype) * (g + wd * w + (0.0 if m is None else mu * m))
        for w, g, m in zip(weights, train_grads, buffers, strict=True)
    ]
    # grad of L_val at (w', alpha) for alpha and w': its statistics are discarded.
    grad_both = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (vector, alpha_grads), (val_logits, _) = grad_both(
        unrolled, alphas, non_trainable, x_val, y_val
    )

    def alpha_gradient(weights_):
        return jax.grad(loss, argnums=1, has_aux=True)(
            weights_, alphas, non_trainable, x_train, y_train
        )[0]

    if trainer.hessian == "exact":
        hvp = hessian_vector_product_exact(alpha_gradient, weights, vector)
    else:
        hvp = hessian_vector_product_fd(alpha_gradient, weights, vector)
    alpha_grads = [g - xi.astype(g.dtype) * h for g, h in zip(alpha_grads, hvp, strict=True)]
    return alpha_grads, val_logits, non_trainable


def _learning_rate(optimizer, values):
    """The optimizer's current learning rate (a variable, or a schedule of its iterations)
    from the optimizer variables' values `values` of this step."""
    with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, values, strict=True))):
        return jnp.asarray(optimizer.learning_rate, "float32")


def hessian_vector_product_fd(alpha_gradient, weights, vector, radius=0.01):
    """DARTS' central difference (grad_a L(w + eps v) - grad_a L(w - eps v)) / (2 eps),
    eps = radius / ||v||."""
    eps = radius / _global_norm(vector)
    plus = alpha_gradient([w + eps * v for w, v in zip(weights, vector, strict=True)])
    minus = alpha_gradient([w - eps * v for w, v in zip(weights, vector, strict=True)])
    return [(p - n) / (2.0 * eps) for p, n in zip(plus, minus, strict=True)]


def hessian_vector_product_exact(alpha_gradient, weights, vector):
    """d/de grad_a L(w + e v) at e = 0, by forward-mode differentiation of the gradient."""
    _, tangent = jax.jvp(alpha_gradient, (weights,), (list(vector),))
    return tangent


def _update_metrics(trainer, metrics_vars, *arguments):
    """Each metric's `stateless_update_state` with its arguments; returns (values, logs)."""
    updated, logs, offset = [], {}, 0
    for metric, args in zip(trainer.metrics, arguments, strict=True):
        count = len(metric.variables)
        values = metric.stateless_update_state(metrics_vars[offset : offset + count], *args)
        logs[metric.name] = metric.stateless_result(values)
        updated.extend(values)
        offset += count
    return updated, logs


def test_step(trainer, state, data):
    trainable, non_trainable, metrics_vars = state
    x, y = data
    logits, non_trainable = trainer.stateless_call(trainable, non_trainable, x, training=False)
    # The two validation trackers: leave the others as they are.
    metrics, updated, logs, offset = trainer.metrics, list(metrics_vars), {}, 0
    for metric in metrics:
        count = len(metric.variables)
        if metric is trainer.val_loss_tracker or metric is trainer.val_accuracy:
            if metric is trainer.val_loss_tracker:
                args = (trainer.per_example_loss(y, logits),)
            else:
                args = (y, logits)
            values = metric.stateless_update_state(updated[offset : offset + count], *args)
            updated[offset : offset + count] = values
            logs[metric.name] = metric.stateless_result(values)
        offset += count
    return logs, (trainable, non_trainable, updated)


def check_backend():
    if keras.backend.backend() != "jax":
        raise RuntimeError("pibconv_tf.search.jax_step runs on Keras' JAX backend only.")
