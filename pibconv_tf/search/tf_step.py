"""The TensorFlow search step: DARTS' two updates under a tf.distribute strategy.

Distribution: losses are this replica's share of the global-batch mean, and every gradient
is summed over the replicas *before* it is used (the norm for clipping, the unrolled weights
of the second order). Keras optimisers sum the gradients they are given once more, so the
already-summed gradients are handed to them divided by the number of replicas.
"""

import tensorflow as tf
from keras import ops

from pibconv_tf.search import architect as architect_lib
from pibconv_tf.search import grouped, regularization
from pibconv_tf.search import loss_scale as loss_scale_lib


def clip_by_global_norm(grads, max_norm):
    """PyTorch's `clip_grad_norm_`: scale by max_norm / (norm + 1e-6) when that is below 1."""
    # Stacked by shape (`grouped`): one l2_loss and one product per shape, not per weight.
    groups = grouped.ShapeGroups(grads)
    stacked = groups.stack(list(grads))
    norm = grouped.global_norm(stacked)
    scale = tf.minimum(1.0, max_norm / (norm + 1e-6))
    return groups.unstack([g * tf.cast(scale, g.dtype) for g in stacked]), norm


def make_architect(trainer):
    return architect_lib.Architect(
        trainer.network,
        lambda labels, logits: replica_loss(trainer, labels, logits),
        order=trainer.order,
        momentum=getattr(trainer.optimizer, "momentum", 0.0),
        weight_decay=getattr(trainer.optimizer, "coupled_weight_decay", 0.0),
        loss_scale=trainer.loss_scale,
    )


def replica_loss(trainer, labels, logits):
    """This replica's share of the global-batch mean loss."""
    per_example = ops.cast(trainer.per_example_loss(labels, logits), "float32")
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    global_batch = ops.cast(ops.shape(per_example)[0] * replicas, "float32")
    return ops.sum(per_example) / global_batch


def _momentum_buffers(trainer):
    if trainer.order == "first" or not hasattr(trainer.optimizer, "momentum_buffer"):
        return None
    return [trainer.optimizer.momentum_buffer(v) for v in trainer.network.weight_parameters()]


def train_step(trainer, data):
    train_batch, val_batch = data
    network, architect = trainer.network, trainer.architect
    xi = trainer.optimizer.learning_rate
    alpha_grads, _, val_logits = architect.gradients(
        train_batch, val_batch, xi, _momentum_buffers(trainer)
    )
    if trainer.beta_coefficient is not None:
        # Once, on the replicas' summed gradients (every replica adds the same term).
        alphas = [tf.convert_to_tensor(a) for a in architect.alphas]
        alpha_grads = regularization.add_beta_decay(
            alpha_grads, alphas, trainer.beta_coefficient.value
        )
    alphas_finite = _update(trainer, trainer.arch_optimizer, alpha_grads, network.arch_parameters())

    x, y = train_batch
    weights = architect.weights
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(weights)
        logits = network(x, training=True)
        loss = replica_loss(trainer, y, logits)
    grads = architect_lib.gradient(tape, loss, weights, trainer.loss_scale)
    grads, norm = clip_by_global_norm(grads, trainer.grad_clip)
    weights_finite = _update(trainer, trainer.optimizer, grads, network.weight_parameters())
    if trainer.loss_scale is not None:
        trainer.loss_scale.update(tf.logical_and(alphas_finite, weights_finite))

    trainer.loss_tracker.update_state(trainer.per_example_loss(y, logits))
    trainer.accuracy.update_state(y, logits)
    # A skipped float16 step (overflowed gradients) has no meaningful validation loss
    # (the unrolled weights are not finite) or gradient norm: leave them out.
    val_y = val_batch[1]
    _track(trainer.val_loss_tracker, alphas_finite, trainer.per_example_loss(val_y, val_logits))
    _track(trainer.val_accuracy, alphas_finite, val_y, val_logits)
    _track(trainer.grad_norm, weights_finite, norm)
    return {metric.name: metric.result() for metric in trainer.metrics}


def _update(trainer, optimizer, grads, variables):
    """Applies `grads`; with a loss scale, only if they are all finite (returned)."""
    if trainer.loss_scale is None:
        _apply(optimizer, grads, variables)
        return None
    finite = trainer.loss_scale.all_finite(grads)
    loss_scale_lib.apply_if_finite(finite, lambda: _apply(optimizer, grads, variables))
    return finite


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
