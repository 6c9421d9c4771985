"""Dynamic loss scaling for float16 search steps, shared by both updates of a step.

Keras' `LossScaleOptimizer` wraps one optimiser; a search step has two updates whose
gradients (and, in the second order, the unrolled weights) all come from scaled losses, so
one scale serves them all and a step is applied or skipped as a whole. The rule is Keras':
start at 2^15, halve and skip the step when a gradient is not finite, double after 2000
finite steps in a row.
"""

import tensorflow as tf
from keras import ops


class DynamicLossScale:
    """The current loss scale and its update rule (variables live in the strategy's scope).

    Args:
        initial_scale: the first scale.
        growth_steps: finite steps in a row after which the scale doubles.
    """

    def __init__(self, initial_scale=2.0**15, growth_steps=2000):
        self.growth_steps = growth_steps
        # Replicas agree on every value (gradients are all-reduced); keep the first's.
        options = dict(
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_WRITE,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.scale = tf.Variable(initial_scale, dtype=tf.float32, name="loss_scale", **options)
        self.good_steps = tf.Variable(0, dtype=tf.int64, name="good_steps", **options)

    def unscale(self, grads):
        return [g / ops.cast(self.scale, g.dtype) for g in grads]

    @staticmethod
    def all_finite(grads):
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])

    def update(self, finite):
        """Halves the scale after a non-finite step; doubles it after `growth_steps` good ones."""
        grow = tf.logical_and(finite, self.good_steps + 1 >= self.growth_steps)
        scale = tf.where(finite, tf.where(grow, 2.0 * self.scale, self.scale), 0.5 * self.scale)
        good = tf.where(tf.logical_and(finite, tf.logical_not(grow)), self.good_steps + 1, 0)
        self.scale.assign(scale)
        self.good_steps.assign(tf.cast(good, tf.int64))


def apply_if_finite(finite, apply_fn):
    """Runs `apply_fn` (optimizer updates) only if `finite`, under any tf.distribute strategy.

    Optimizer updates call `merge_call`, which a cond in a replica context may not contain;
    as Keras' LossScaleOptimizer does, the cond then runs in the cross-replica context.
    """
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(finite, lambda: _run(apply_fn), _skip)
        return

    def cross_replica(distribution, finite):
        finite = distribution.experimental_local_results(finite)[0]
        on_each_replica = lambda: distribution.extended.call_for_each_replica(apply_fn)  # noqa: E731
        tf.cond(finite, lambda: _run(on_each_replica), _skip)

    tf.distribute.get_replica_context().merge_call(cross_replica, args=(finite,))


def _run(fn):
    fn()
    return tf.constant(True)


def _skip():
    return tf.constant(False)
