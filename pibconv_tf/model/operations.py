"""DARTS primitives as Keras layers, and `make_op`, which builds one of a search space.

Every operation maps an NHWC tensor with `filters` channels to one with `filters` channels,
at stride 1 or 2, and computes what the DARTS / PIBConv PyTorch code computes with the same
weights (symmetric padding, -inf padded max pooling, average pooling that excludes padded
cells). `affine=False` is the search setting: BatchNorm without scale and centre.

Reference:
    DARTS: Liu et al., arXiv 1806.09055. PIBConv: Ahmadian et al., arXiv 2301.01286.
"""

import keras
from keras import ops

from pibconv_tf.model import numerics as L
from pibconv_tf.model.pib_conv import ConvNeXtBlock, PIBConv
from pibconv_tf.model.search_spaces import conv_kind, get_search_space

_REGISTER = keras.saving.register_keras_serializable(package="pibconv_tf")


@_REGISTER
class Zero(keras.layers.Layer):
    """The `none` operation: zeros, subsampled by `strides` (DARTS' `Zero`)."""

    def __init__(self, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.strides = strides

    def call(self, inputs):
        if self.strides > 1:
            inputs = inputs[:, :: self.strides, :: self.strides, :]
        return ops.zeros_like(inputs)

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.strides)

    def get_config(self):
        return {**super().get_config(), "strides": self.strides}


@_REGISTER
class Identity(keras.layers.Layer):
    """The stride-1 `skip_connect` operation."""

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


@_REGISTER
class FactorizedReduce(keras.layers.Layer):
    """Halves H and W with two offset 1x1 stride-2 convolutions (DARTS' stride-2 skip).

    ReLU, then `filters // 2` channels from a 1x1 stride-2 convolution of x and
    `filters // 2` from one of x shifted by one pixel, concatenated, then BatchNorm. For odd
    sizes the shifted input is zero-padded at the bottom/right so both halves agree (as in
    the PIBConv code; DARTS fails there). A 1x1 stride-2 convolution is computed as a
    subsampling followed by a 1x1 convolution: the same numbers, a quarter of the work, and
    it avoids oneDNN's strided 1x1 filter gradient, which aborts the process in TF 2.21 for
    some odd batch sizes. With a static size the two subsamplings are one reshape that puts
    each 2x2 block's rows on an axis and its columns beside the channels, then an unstack and
    two splits: a quarter of the time of strided slicing, forward and backward, the same
    numbers.

    Args:
        filters: output channels (even).
        affine: BatchNorm with learnable scale and centre.
        initializer: "torch" (PyTorch's default) or "keras" kernel initialisation.
        activate: apply the ReLU; False for inputs the caller has already passed through it.
    """

    def __init__(self, filters, affine=True, initializer="torch", activate=True, **kwargs):
        super().__init__(**kwargs)
        if filters % 2:
            raise ValueError(f"FactorizedReduce needs an even number of filters, got {filters}.")
        self.filters = filters
        self.affine = affine
        self.initializer = initializer
        self.activate = activate
        self.conv_1 = L.conv2d(filters // 2, 1, 1, initializer, name="conv_1")
        self.conv_2 = L.conv2d(filters // 2, 1, 1, initializer, name="conv_2")
        self.bn = L.batch_norm(affine, name="bn")

    def build(self, input_shape):
        self.conv_1.build(input_shape)
        self.conv_2.build(input_shape)
        out_shape = self.compute_output_shape(input_shape)
        self.bn.build(out_shape)

    def call(self, inputs, training=None):
        x = ops.relu(inputs) if self.activate else inputs
        height, width, channels = x.shape[1:]
        if height is None or width is None or channels is None:
            shifted = ops.pad(x[:, 1:, 1:, :], [[0, 0], [0, 1], [0, 1], [0, 0]])
            even, odd = x[:, ::2, ::2, :], shifted[:, ::2, ::2, :]
        else:
            # Zero-pad to even sizes; then pixel (2i + a, 2j + b), channel c sits at
            # [i, a, j, b * channels + c]: the even grid is a = b = 0, the shifted one a = b = 1.
            x = ops.pad(x, [[0, 0], [0, height % 2], [0, width % 2], [0, 0]])
            blocks = ops.reshape(x, (-1, (height + 1) // 2, 2, (width + 1) // 2, 2 * channels))
            top, bottom = ops.unstack(blocks, 2, axis=2)  # gradients: a stack and a concat,
            even = ops.split(top, 2, axis=-1)[0]  # 4x faster than those of strided slices
            odd = ops.split(bottom, 2, axis=-1)[1]
        halves = [L.conv(self.conv_1, even, training), L.conv(self.conv_2, odd, training)]
        return L.norm(self.bn, ops.concatenate(halves, axis=-1), training)

    def compute_output_shape(self, input_shape):
        return (*_strided_shape(input_shape, 2)[:3], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "affine": self.affine,
            "initializer": self.initializer,
            "activate": self.activate,
        }


class _ConvStack(keras.layers.Layer):
    """Base of the convolutional primitives: arguments, config, and a sequential call."""

    def __init__(
        self,
        filters,
        kernel_size=3,
        strides=1,
        affine=True,
        activation="relu",
        norm="bn",
        initializer="torch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        L.check_choice("activation", activation, L.ACTIVATIONS)
        L.check_choice("norm", norm, L.NORMS)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.affine = affine
        self.activation = activation
        self.norm = norm
        self.initializer = initializer

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "affine": self.affine,
            "activation": self.activation,
            "norm": self.norm,
            "initializer": self.initializer,
        }


@_REGISTER
class ReLUConvBN(_ConvStack):
    """Activation, convolution, norm: DARTS' cell-input preprocessing (1x1) and stem-like op.

    Args:
        filters: output channels.
        kernel_size: odd kernel size; padding is `kernel_size // 2` on each side.
        strides: 1 or 2.
        activate: apply the activation; False when the caller passes inputs it has already
            activated (a network shares one ReLU among a state's consumers).
        affine, activation, norm, initializer: see `SepConv`.
    """

    def __init__(self, filters, kernel_size=1, strides=1, activate=True, **kwargs):
        super().__init__(filters, kernel_size, strides, **kwargs)
        self.activate = activate
        self.conv = L.conv2d(filters, kernel_size, strides, self.initializer, name="conv")
        self.bn = L.norm_layer(self.norm, self.affine, name="bn")

    def build(self, input_shape):
        L.build_sublayers((self.conv, input_shape[-1]), (self.bn, self.filters))

    def call(self, inputs, training=None):
        x = L.activation(inputs, self.activation, training) if self.activate else inputs
        x = L.symmetric_pad(x, self.strides, self.kernel_size // 2)
        return L.norm(self.bn, L.conv(self.conv, x, training), training)

    def get_config(self):
        return {**super().get_config(), "activate": self.activate}


@_REGISTER
class SepConv(_ConvStack):
    """DARTS' separable convolution, applied twice (stacked).

    act, depthwise kxk (stride s), 1x1, norm, act, depthwise kxk, 1x1, norm. The roadmap of
    the PIBConv paper swaps ReLU for GELU (`activation`) and BatchNorm for LayerNorm (`norm`).

    Args:
        filters: input and output channels (C in the DARTS paper).
        kernel_size: 3, 5 or 7.
        strides: 1, or 2 in reduction cells.
        affine: learnable norm scale and centre (False during search).
        activation: "relu" (DARTS) or "gelu" (exact erf form).
        norm: "bn" or "ln" (LayerNorm over channels).
        initializer: "torch" (PyTorch's default, which DARTS trains with) or "keras".

    Call arguments:
        inputs: NHWC tensor with `filters` channels.
        training: whether BatchNorm uses batch statistics.

    Example:
    >>> op = SepConv(filters=8, kernel_size=3, strides=2)
    >>> op(keras.ops.ones((2, 16, 16, 8))).shape
    (2, 8, 8, 8)

    Reference:
        Liu et al., DARTS, arXiv 1806.09055.
    """

    def __init__(self, filters, kernel_size=3, strides=1, **kwargs):
        super().__init__(filters, kernel_size, strides, **kwargs)
        init = self.initializer
        self.dw_1 = L.depthwise_conv2d(kernel_size, strides, init, name="dw_1")
        self.pw_1 = L.conv2d(filters, 1, 1, init, name="pw_1")
        self.norm_1 = L.norm_layer(self.norm, self.affine, name="norm_1")
        self.dw_2 = L.depthwise_conv2d(kernel_size, 1, init, name="dw_2")
        self.pw_2 = L.conv2d(filters, 1, 1, init, name="pw_2")
        self.norm_2 = L.norm_layer(self.norm, self.affine, name="norm_2")

    def build(self, input_shape):
        f = self.filters
        L.build_sublayers(
            (self.dw_1, input_shape[-1]),
            (self.pw_1, input_shape[-1]),
            (self.norm_1, f),
            (self.dw_2, f),
            (self.pw_2, f),
            (self.norm_2, f),
        )

    def call(self, inputs, training=None):
        pad = self.kernel_size // 2
        x = L.activation(inputs, self.activation, training)
        x = L.depthwise(self.dw_1, x, training, pad)
        x = L.norm(self.norm_1, L.conv(self.pw_1, x, training), training)
        x = L.activation(x, self.activation, training)
        x = L.depthwise(self.dw_2, x, training, pad)
        x = L.norm(self.norm_2, L.conv(self.pw_2, x, training), training)
        return x


@_REGISTER
class DilConv(_ConvStack):
    """DARTS' dilated separable convolution: act, depthwise kxk dilated, 1x1, norm.

    Args:
        filters, kernel_size, strides, affine, activation, norm, initializer: see `SepConv`.
        dilation_rate: 2 in DARTS; padding is `dilation_rate * (kernel_size - 1) // 2`.
    """

    def __init__(self, filters, kernel_size=3, strides=1, dilation_rate=2, **kwargs):
        super().__init__(filters, kernel_size, strides, **kwargs)
        self.dilation_rate = dilation_rate
        init = self.initializer
        self.dw = L.depthwise_conv2d(kernel_size, strides, init, "dw", dilation_rate)
        self.pw = L.conv2d(filters, 1, 1, init, name="pw")
        self.bn = L.norm_layer(self.norm, self.affine, name="bn")

    def build(self, input_shape):
        c = input_shape[-1]
        L.build_sublayers((self.dw, c), (self.pw, c), (self.bn, self.filters))

    def call(self, inputs, training=None):
        pad = self.dilation_rate * (self.kernel_size - 1) // 2
        x = L.activation(inputs, self.activation, training)
        x = L.depthwise(self.dw, x, training, pad)
        return L.norm(self.bn, L.conv(self.pw, x, training), training)

    def get_config(self):
        return {**super().get_config(), "dilation_rate": self.dilation_rate}


@_REGISTER
class Conv7x1_1x7(_ConvStack):  # noqa: N801 (the DARTS operation name)
    """act, full 1x7 conv (stride (1, s)), full 7x1 conv (stride (s, 1)), norm."""

    def __init__(self, filters, kernel_size=7, strides=1, **kwargs):
        super().__init__(filters, kernel_size, strides, **kwargs)
        init = self.initializer
        k = kernel_size
        self.conv_1xk = L.conv2d(filters, (1, k), (1, strides), init, name="conv_1xk")
        self.conv_kx1 = L.conv2d(filters, (k, 1), (strides, 1), init, name="conv_kx1")
        self.bn = L.norm_layer(self.norm, self.affine, name="bn")

    def build(self, input_shape):
        f = self.filters
        L.build_sublayers((self.conv_1xk, input_shape[-1]), (self.conv_kx1, f), (self.bn, f))

    def call(self, inputs, training=None):
        pad = self.kernel_size // 2
        x = L.activation(inputs, self.activation, training)
        x = L.conv(self.conv_1xk, L.symmetric_pad(x, (1, self.strides), 0, pad), training)
        x = L.conv(self.conv_kx1, L.symmetric_pad(x, (self.strides, 1), pad, 0), training)
        return L.norm(self.bn, x, training)


@_REGISTER
class Pool3x3(keras.layers.Layer):
    """3x3 max or average pooling with PyTorch's padding=1 semantics.

    Max pooling pads with -inf (a padded cell never wins); average pooling divides by the
    number of real cells in the window (`count_include_pad=False`).

    Args:
        pool_type: "max" or "avg".
        strides: 1 or 2.
    """

    def __init__(self, pool_type="max", strides=1, **kwargs):
        super().__init__(**kwargs)
        L.check_choice("pool_type", pool_type, ("max", "avg"))
        self.pool_type = pool_type
        self.strides = strides

    def call(self, inputs):
        mode = L.padding_mode(self.strides)
        if self.pool_type == "max":
            x = L.symmetric_pad(inputs, self.strides, 1, value=float("-inf"))
            return ops.max_pool(x, 3, self.strides, padding=mode)
        if mode == "same":
            # TensorFlow's "same" average pooling already excludes padded cells.
            return ops.average_pool(inputs, 3, 1, padding="same")
        summed = ops.average_pool(L.symmetric_pad(inputs, 2, 1), 3, 2, padding="valid")
        ones = ops.ones_like(inputs[:1, :, :, :1])
        counts = ops.average_pool(L.symmetric_pad(ones, 2, 1), 3, 2, padding="valid")
        return summed / counts

    def compute_output_shape(self, input_shape):
        return _strided_shape(input_shape, self.strides)

    def get_config(self):
        return {**super().get_config(), "pool_type": self.pool_type, "strides": self.strides}


def _strided_shape(shape, strides):
    def down(size):
        return None if size is None else (size + strides - 1) // strides

    return (shape[0], down(shape[1]), down(shape[2]), shape[3])


def _kernel(op_name):
    return int(op_name.rsplit("_", 1)[1].split("x")[0])


def make_op(
    op_name,
    filters,
    strides,
    affine,
    search_space="pibconv",
    initializer="torch",
    name=None,
    activations=None,
):
    """Builds operation `op_name` of `search_space` (DARTS' `OPS[name](C, stride, affine)`).

    `activations` ({kind: activation}, see `SearchSpace.activations`) overrides the space's,
    for cells that recorded theirs.
    """
    space = get_search_space(search_space)
    if op_name not in space.primitives:
        raise ValueError(
            f"Operation {op_name!r} is not in search space {space.name!r}; "
            f"expected one of {', '.join(space.primitives)}."
        )
    chosen = space.activation_map() if activations is None else dict(activations)
    conv = dict(
        affine=affine,
        activation=chosen.get(conv_kind(op_name), "relu"),
        norm=space.norm,
        initializer=initializer,
        name=name,
    )
    if op_name == "none":
        return Zero(strides, name=name)
    if op_name == "skip_connect":
        if strides == 1:
            return Identity(name=name)
        return FactorizedReduce(filters, affine, initializer, name=name)
    if op_name in ("max_pool_3x3", "avg_pool_3x3"):
        return Pool3x3(op_name[:3], strides, name=name)
    if op_name.startswith("sep_conv"):
        return SepConv(filters, _kernel(op_name), strides, **conv)
    if op_name.startswith("dil_conv"):
        return DilConv(filters, _kernel(op_name), strides, **conv)
    if op_name == "conv_7x1_1x7":
        return Conv7x1_1x7(filters, 7, strides, **conv)
    if op_name.startswith("pib_conv"):
        return PIBConv(
            filters,
            _kernel(op_name),
            strides,
            affine,
            expansion=space.pib_expansion,
            initializer=initializer,
            name=name,
        )
    return ConvNeXtBlock(
        filters, _kernel(op_name), strides, affine, initializer=initializer, name=name
    )
