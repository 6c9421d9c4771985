"""DARTS' mixed operation: the softmax-weighted sum of every operation of a search space.

Reference:
    Liu et al., DARTS, arXiv 1806.09055 (Eq. 1); Ahmadian et al., arXiv 2301.01286.
"""

import keras
from keras import ops

from pibconv_tf import layers as L
from pibconv_tf import ops as ops_lib


@keras.saving.register_keras_serializable(package="pibconv_tf")
class MixedOp(keras.layers.Layer):
    """One edge of the search cell: sum_k w_k * op_k(x) over the space's operations.

    Every operation is built as in the search (`affine=False` norms). Where the space says so
    (`SearchSpace.pool_batch_norm`: the DARTS spaces), the pooling operations are followed by
    a BatchNorm without scale and centre, as in DARTS' MixedOp, so that their outputs live on
    the scale of the convolutions'; the PIBConv code's MixedOp (space `pibconv`) applies the
    pools alone. The `none` operation contributes
    w_none * 0 = 0 and its gradient with respect to every weight is zero, so it is not
    computed at all: the sum and all gradients are exactly DARTS' (w_none still takes its
    share of the softmax, which is where its architecture gradient comes from).

    Args:
        filters: input and output channels (C in the DARTS paper).
        strides: 1, or 2 on the edges that leave a reduction cell's inputs.
        search_space: name of a space in `ops.SEARCH_SPACES`, e.g. "pibconv".
        initializer: "torch" (PyTorch's default, as DARTS) or "keras".

    Call arguments:
        inputs: NHWC tensor with `filters` channels.
        weights: [num_ops] mixing weights, one per operation of the space in its order
            (a row of softmax(alpha)).
        training: whether BatchNorm uses batch statistics.

    Example:
    >>> op = MixedOp(filters=8, strides=1, search_space="darts")
    >>> w = keras.ops.softmax(keras.ops.zeros((8,)))
    >>> op(keras.ops.ones((2, 16, 16, 8)), w).shape
    (2, 16, 16, 8)

    Reference:
        Liu et al., DARTS, arXiv 1806.09055, Sec. 2.2.
    """

    def __init__(self, filters, strides=1, search_space="pibconv", initializer="torch", **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides
        self.search_space = search_space
        self.initializer = initializer
        space = ops_lib.get_search_space(search_space)
        self.primitives = space.primitives
        self.candidates = []  # (column of the weights, op, BatchNorm after a pool or None)
        for index, op_name in enumerate(self.primitives):
            if op_name == "none":
                continue
            op = ops_lib.make_op(
                op_name, filters, strides, False, search_space, initializer, name=op_name
            )
            pooled = space.pool_batch_norm and "pool" in op_name
            norm = L.batch_norm(False, name=f"{op_name}_bn") if pooled else None
            self.candidates.append((index, op, norm))
        # Optional callable (op, inputs, weights, training) -> outputs that computes
        # `mixed_sum` in a backend-specific way (e.g. one trace shared by all edges of the same
        # configuration); set by the trainer, never serialised.
        self.executor = None

    def build(self, inputs_shape, weights_shape):
        # The operations build their own weights at the first (eager) call; building them by
        # Keras' default, a symbolic trace of `call` per nesting level, takes minutes for the
        # 8-cell network.
        self.built = True

    def call(self, inputs, weights, training=None):
        if self.executor is not None:
            return self.executor(self, inputs, weights, training)
        return self.mixed_sum(inputs, weights, training)

    def mixed_sum(self, inputs, weights, training=None):
        """sum_k weights[k] * op_k(inputs), without the executor."""
        weights = ops.cast(weights, inputs.dtype)
        total = None
        for index, op, norm in self.candidates:
            y = op(inputs, training=training)
            if norm is not None:
                y = norm(y, training=training)
            y = weights[index] * y
            total = y if total is None else total + y
        return total

    def configuration(self):
        """What makes two MixedOps compute the same function of (inputs, weights, variables)."""
        return (self.filters, self.strides, self.search_space, self.initializer)

    def compute_output_shape(self, input_shape):
        size = [None if s is None else (s + self.strides - 1) // self.strides for s in input_shape]
        return (input_shape[0], size[1], size[2], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "search_space": self.search_space,
            "initializer": self.initializer,
        }
