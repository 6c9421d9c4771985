"""The architecture gradient of DARTS: first order, and the one-step unrolled second order.

With w the network weights, alpha the architecture and xi the weight learning rate, DARTS
(Eq. 6-8) updates alpha along

    first order:   grad_alpha L_val(w, alpha)
    second order:  grad_alpha L_val(w', alpha) - xi * H v,   w' = w - xi * (mu * m + g + wd * w)

where g = grad_w L_train(w, alpha), m is the SGD momentum buffer, mu the momentum, wd the
weight decay (DARTS' `_compute_unrolled_model`), v = grad_w' L_val(w', alpha) and
H v = grad^2_{alpha, w} L_train(w, alpha) v. DARTS estimates H v by central differences,

    H v ~ (grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps),
    w+- = w +- eps v,  eps = 0.01 / ||v||,

what is implemented here. (An "exact" H v by nested tapes is not offered: it differentiates
the whole backward pass once more, which costs more than the two extra first-order passes
of the finite difference. Beware if you add it: Keras' BatchNorm on TensorFlow
(`tf.nn.moments`) stops the gradient through the batch mean inside the variance, which
leaves first derivatives right and second derivatives wrong (0.4% on one layer); the fused
kernel of `pibconv_tf.kernels` and Keras' BatchNorm on JAX have exact second derivatives.)
The weights are never modified: the unrolled and perturbed networks are evaluated in a
`keras.StatelessScope` that substitutes the weight values, so w is restored exactly by
construction and BatchNorm statistics of those extra passes are discarded (DARTS evaluates
them on a throwaway copy for w', on the model itself for w+-; the statistics only matter for
inference, which the search never uses), so that TensorFlow's shared traces neither take nor
return them there (`shared_trace.statistics_discarded`). Each weight is read once per step
for w' and w+-.

Under a tf.distribute strategy every gradient is summed over the replicas before it is used,
so all replicas compute the same w', the same eps and the same w+-.

Reference:
    Liu et al., DARTS, arXiv 1806.09055, Sec. 2.3 (Eq. 6-8), `cnn/architect.py`.
"""

import contextlib

import keras
import tensorflow as tf

from pibconv_tf.search import grouped
from pibconv_tf.search.shared_trace import statistics_discarded

ORDERS = ("first", "second")


def all_reduce_sum(values):
    """Sums `values` (a list of tensors) over the replicas; the identity on one replica."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(values)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, list(values))


def gradient(tape, loss, sources, loss_scale=None):
    """grad(loss, sources) summed over replicas, through a `DynamicLossScale` if given.

    The scale enters as the upstream gradient (so float16 backpropagation sees scaled
    values) and is divided out after the all-reduce. A source the loss does not use (the
    normal cells' alphas of a search of fewer than 3 layers) gets zeros, as on JAX.
    """
    upstream = None if loss_scale is None else tf.cast(loss_scale.scale, loss.dtype)
    grads = tape.gradient(
        loss,
        sources,
        output_gradients=upstream,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    grads = all_reduce_sum(grads)
    return grads if loss_scale is None else loss_scale.unscale(grads)


def _tf_variable(variable):
    # Keras variables wrap a tf.Variable, which is what GradientTape.watch accepts.
    return variable.value if isinstance(variable, keras.Variable) else variable


class Architect:
    """Computes DARTS' architecture gradient of a `SearchNetwork`.

    Args:
        network: a built `SearchNetwork` (alphas via `arch_parameters()`, weights via
            `weight_parameters()`).
        loss_fn: (labels, logits) -> this replica's share of the global-batch mean loss
            (sum of the per-example losses / global batch size).
        order: "first" or "second" (DARTS' `--unrolled`).
        momentum: the weight optimiser's momentum (mu).
        weight_decay: the weight optimiser's coupled weight decay (wd).
        hessian_radius: r of eps = r / ||v|| (0.01 in DARTS).
        loss_scale: a `DynamicLossScale` (float16), or None.

    Example:
    ```python
    architect = Architect(network, loss_fn, order="second")
    grads, val_loss, val_logits = architect.gradients(
        (x_train, y_train), (x_val, y_val), xi=0.0025, momentum_buffers=buffers
    )
    ```

    Reference:
        Liu et al., DARTS, arXiv 1806.09055, Eq. 6-8.
    """

    def __init__(
        self,
        network,
        loss_fn,
        order="first",
        momentum=0.9,
        weight_decay=3e-4,
        hessian_radius=0.01,
        loss_scale=None,
    ):
        if order not in ORDERS:
            raise ValueError(f"Unknown order {order!r}; expected one of {', '.join(ORDERS)}.")
        self.network = network
        self.loss_fn = loss_fn
        self.order = order
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.hessian_radius = hessian_radius
        self.loss_scale = loss_scale

    @property
    def alphas(self):
        """The alphas as tf.Variables (what GradientTape watches)."""
        return [_tf_variable(v) for v in self.network.arch_parameters()]

    @property
    def weights(self):
        """The weights as tf.Variables, in `weight_parameters()` order."""
        return [_tf_variable(v) for v in self.network.weight_parameters()]

    def loss(self, batch, weight_values=None):
        """(loss, logits) on `batch` in training mode, optionally at substituted weights
        (whose BatchNorm statistics are then discarded)."""
        x, y = batch
        if weight_values is None:
            logits = self.network(x, training=True)
        else:
            keras_weights = self.network.weight_parameters()
            mapping = list(zip(keras_weights, weight_values, strict=True))
            with keras.StatelessScope(state_mapping=mapping), statistics_discarded():
                logits = self.network(x, training=True)
        return self.loss_fn(y, logits), logits

    def gradients(self, train_batch, val_batch, xi=None, momentum_buffers=None):
        """Returns ([d alphas_normal, d alphas_reduce], val loss, val logits).

        The gradients are summed over replicas. `xi` (the current weight learning rate) and
        `momentum_buffers` (one per weight, None for zeros) are used by the second order.
        """
        if self.order == "first":
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(self.alphas)
                loss, logits = self.loss(val_batch)
            return self._gradient(tape, loss, self.alphas), loss, logits
        return self._finite_difference(train_batch, val_batch, xi, momentum_buffers)

    def _gradient(self, tape, loss, sources):
        return gradient(tape, loss, sources, self.loss_scale)

    def unrolled_weights(self, train_grads, xi, momentum_buffers=None, weights=None):
        """w' = w - xi * (mu * m + g + wd * w): one virtual SGD step (no gradient clipping).

        `weights`: the values of w if already read (None reads them).
        """
        weights = self._read(weights)
        with_momentum = momentum_buffers is not None
        lists = [weights, train_grads]
        if with_momentum:
            lists.append([tf.convert_to_tensor(m) for m in momentum_buffers])

        def virtual_step(w, g, m=None):
            step = g + self.weight_decay * w
            if with_momentum:
                step = step + self.momentum * m
            return w - tf.cast(xi, w.dtype) * step

        # One node per shape of weight rather than per weight (`grouped`), same arithmetic.
        return grouped.ShapeGroups(weights).map(virtual_step, *lists)

    def _weight_gradients(self, batch):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.weights)
            loss, _ = self.loss(batch)
        return self._gradient(tape, loss, self.weights)

    def _read(self, weights=None):
        if weights is None:
            weights = [tf.convert_to_tensor(w) for w in self.weights]
        return list(weights)

    def _finite_difference(self, train_batch, val_batch, xi, momentum_buffers):
        # w is read once for w' and w+- (a read per weight and use would add ~2,000 nodes).
        weights = self._read()
        unrolled = self.unrolled_weights(
            self._weight_gradients(train_batch), xi, momentum_buffers, weights
        )
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.alphas)
            tape.watch(unrolled)
            val_loss, val_logits = self.loss(val_batch, unrolled)
        grads = self._gradient(tape, val_loss, self.alphas + unrolled)
        alpha_grads, vector = grads[: len(self.alphas)], grads[len(self.alphas) :]
        hvp = self.hessian_vector_product(vector, train_batch, weights)
        alpha_grads = [g - tf.cast(xi, g.dtype) * h for g, h in zip(alpha_grads, hvp, strict=True)]
        return alpha_grads, val_loss, val_logits

    def hessian_vector_product(self, vector, batch, weights=None):
        """DARTS' central difference (grad_a L(w + eps v) - grad_a L(w - eps v)) / (2 eps).

        `weights`: the values of w if already read (None reads them).
        """
        weights = self._read(weights)
        # One node per shape of weight rather than per weight (`grouped`), same arithmetic.
        groups = grouped.ShapeGroups(weights)
        stacked_weights, stacked_vector = groups.stack(weights), groups.stack(list(vector))
        eps = self.hessian_radius / grouped.global_norm(stacked_vector)
        sides = []
        for sign in (1.0, -1.0):
            # The two passes are independent; run them one after the other, so that their
            # activations are not held in memory at the same time.
            with tf.control_dependencies(sides[0]) if sides else contextlib.nullcontext():
                shifted = groups.unstack(
                    [
                        w + sign * eps * v
                        for w, v in zip(stacked_weights, stacked_vector, strict=True)
                    ]
                )
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(self.alphas)
                loss, _ = self.loss(batch, shifted)
            sides.append(self._gradient(tape, loss, self.alphas))
        return [(p - n) / (2.0 * eps) for p, n in zip(*sides, strict=True)]
