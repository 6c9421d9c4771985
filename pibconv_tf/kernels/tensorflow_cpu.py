"""TensorFlow's faster training kernels for the model, on CPUs (`register` installs them).

Each kernel computes what the model's plain form computes (to rounding), faster in
TensorFlow on a CPU, and returns None where it does not apply (another dtype, an unknown
size, a layer not built yet), so that the plain form runs. Measured in docs/performance.md
("Update (third)"); `python -m benchmarks.kernels` re-times the oneDNN workarounds against
TensorFlow's own kernels (a ratio at or below 1 after a TensorFlow upgrade: that one can go).

- batch_norm_training: TensorFlow's fused BatchNorm (one pass forward, one backward; 1.5x
  faster than Keras' moments), on a [N H W, 1, 1, C] view when C is not a multiple of 16.
- conv2d_training: a 1x1 stride-1 convolution as one matrix product (15-20% faster).
- depthwise_conv2d_training: oneDNN's slow depthwise filter gradients and strided padding
  avoided (`depthwise_conv2d_training` below).
- gelu_training: GELU with a hand-written gradient that reuses the forward's Phi(x) (30%).
- pib_conv_expand_group: PIBConv's expansion and grouped convolution as F branches of a
  1x1 and a depthwise convolution, summed (no channel interleaving; ~15% of a step).
- conv_batch_norm_training: the stem's convolution and BatchNorm as one product of the
  centred image patches (their batch statistics from the patches' covariance).
- after: a control dependency that starts a cell's s0 preprocessing once s1 exists (TF's
  executor has no priorities; 5% of the 2-layer step).
"""

import functools
import math

import keras
import tensorflow as tf
from keras import ops

from pibconv_tf.model import acceleration
from pibconv_tf.model import numerics as L

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def helps():
    """Where "auto" turns these kernels on: TensorFlow on a machine without GPUs."""
    return keras.backend.backend() == "tensorflow" and _cpu_only()


def register():
    """Registers every kernel with `model.acceleration`."""
    kernels = {
        "batch_norm_training": batch_norm_training,
        "conv2d_training": conv2d_training,
        "depthwise_conv2d_training": depthwise_layer_training,
        "gelu_training": gelu_training,
        "pib_conv_expand_group": pib_conv_expand_group,
        "conv_batch_norm_training": conv_batch_norm_training,
        "after": after,
    }
    for name, function in kernels.items():
        acceleration.register(name, function, helps)


# --------------------------------------------------------------------------------------
# Layer kernels (the model's `numerics.norm`, `conv`, `depthwise`, `gelu` and the blocks)
# --------------------------------------------------------------------------------------


def batch_norm_training(layer, inputs):
    """A training-mode `BatchNormalization` call with TensorFlow's fused kernel, or None."""
    if not layer.built or layer.synchronized or not fused_batch_norm_available(inputs):
        return None
    if getattr(layer, "renorm", False) or layer.axis not in (-1, len(inputs.shape) - 1):
        return None
    y, mean, variance = fused_batch_norm_training(
        inputs,
        layer.gamma if layer.scale else None,
        layer.beta if layer.center else None,
        layer.epsilon,
    )
    update_moving_statistics(layer, mean, variance, "float32")
    return ops.cast(y, layer.compute_dtype)


def update_moving_statistics(layer, mean, variance, dtype):
    """Keras' moving averages of a BatchNorm layer, from this batch's statistics."""
    decay = layer.momentum
    layer.moving_mean.assign(ops.cast(layer.moving_mean, dtype) * decay + mean * (1 - decay))
    layer.moving_variance.assign(
        ops.cast(layer.moving_variance, dtype) * decay + variance * (1 - decay)
    )


def conv2d_training(layer, inputs):
    """A 1x1 stride-1 bias-free `Conv2D` as one matrix product over the pixels, or None."""
    plain = (layer.kernel_size, layer.strides, layer.dilation_rate) == ((1, 1),) * 3
    plain = plain and layer.groups == 1 and layer.data_format == "channels_last"
    if not (plain and layer.built and not layer.use_bias and len(inputs.shape) == 4):
        return None
    outputs = pointwise(inputs, ops.cast(layer.kernel, inputs.dtype))
    return outputs if layer.activation is None else layer.activation(outputs)


def pointwise(x, kernel):
    """A 1x1 stride-1 convolution of NHWC `x` by `kernel` (1, 1, C_in, C_out) as a matmul."""
    shape = ops.shape(x)
    y = ops.matmul(ops.reshape(x, (-1, kernel.shape[2])), ops.reshape(kernel, kernel.shape[2:]))
    return ops.reshape(y, (shape[0], shape[1], shape[2], kernel.shape[3]))


def depthwise_layer_training(layer, inputs, pad):
    """A `DepthwiseConv2D` with PyTorch's padding `pad` by `depthwise_conv2d_training`, or
    None where those kernels do not apply."""
    plain = layer.built and not layer.use_bias and layer.depth_multiplier == 1
    plain = plain and layer.data_format == "channels_last"
    plain = plain and layer.padding == L.padding_mode(layer.strides)
    if not plain or not depthwise_training_available(
        inputs, layer.kernel_size, layer.strides, layer.dilation_rate
    ):
        return None
    kernel = ops.cast(layer.kernel, inputs.dtype)
    outputs = depthwise_conv2d_training(inputs, kernel, layer.strides, layer.dilation_rate, pad)
    return outputs if layer.activation is None else layer.activation(outputs)


def gelu_training(x):
    """Exact GELU, x * Phi(x), whose gradient Phi(x) + x * phi(x) reuses the forward's
    Phi(x): forward and backward 30% faster on CPU than differentiating GELU's graph (which
    recomputes erf's pieces). The gradient is itself differentiable (second derivatives
    hold)."""
    return _gelu_with_gradient(x)


@ops.custom_gradient
def _gelu_with_gradient(x):
    cdf = 0.5 * ops.erfc(x * -_SQRT_HALF)  # TensorFlow's form: exact in the far left tail

    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        density = ops.exp(-0.5 * ops.square(x)) * _INV_SQRT_2PI
        return upstream * (cdf + x * density)

    return x * cdf, grad


def pib_conv_expand_group(block, x):
    """PIBConv's 1x1 expansion C -> F*C and grouped kxk F*C -> C (groups C) in training.

    Input i of group g is expanded channel F*g + i, so the pair is F branches summed: branch
    i is a 1x1 convolution by column block i of the expansion kernel (C -> C) followed by a
    depthwise convolution with `grouped_kernel[:, :, i, :]`. No channel interleaving is
    summed: a PIBCONV training step takes ~15% less time on CPU than with the 5-D reshape
    and sum, whose broadcast gradient is slow.
    """
    if not block.built or len(x.shape) != 4:
        return None
    k, f, c = block.kernel_size, block.expansion, block.filters
    expand = ops.cast(block.pw_expand.kernel, x.dtype)
    # Column f*g + i of the expansion kernel feeds input i of group g.
    expand = ops.reshape(expand, (1, 1, expand.shape[2], c, f))
    grouped = ops.cast(block.grouped_kernel, x.dtype)
    # Unstacked, not sliced: the gradient of an unstack is one stack, cheaper than a
    # strided-slice gradient per piece.
    expand, grouped = ops.unstack(expand, f, axis=-1), ops.unstack(grouped, f, axis=2)
    total = None
    for i in range(f):
        y = pointwise(x, expand[i])
        depthwise = ops.reshape(grouped[i], (k, k, c, 1))
        if depthwise_training_available(y, (k, k), (1, 1), (1, 1)):
            y = depthwise_conv2d_training(y, depthwise)
        else:
            y = ops.depthwise_conv(y, depthwise, strides=1, padding="same")
        total = y if total is None else total + y
    return total


def conv_batch_norm_training(layer, inputs):
    """The stem (`numerics.ConvBatchNorm`) in training as one product, exactly.

    With P the N*H*W x K*K*C_in image patches, the convolution is P @ W, so its batch mean
    is mean(P) @ W and its batch variance diag(W^T cov(P) W), where cov(P) is only K*K*C_in
    square. The normalised output is then one matrix product of the centred patches by W
    scaled per channel, plus the shift: the convolution's and BatchNorm's passes over the
    N*H*W x C_out output (forward and backward) become one matrix product each way. Same
    weights, moving statistics and numbers (to rounding) as `conv` then `bn`; None for
    float16 / bfloat16 inputs (whose statistics this form would lose precision in), and for a
    synchronized BatchNorm (its statistics are the global batch's, over all replicas).
    """
    if not layer.built or inputs.dtype not in ("float32", "float64") or len(inputs.shape) != 4:
        return None
    if layer.bn.synchronized:
        return None
    k, filters, bn = layer.kernel_size, layer.filters, layer.bn
    shape = ops.shape(inputs)
    patches = ops.image.extract_patches(inputs, (k, k), strides=(1, 1), padding="same")
    patches = ops.reshape(patches, (-1, k * k * inputs.shape[-1]))
    kernel = ops.reshape(ops.cast(layer.conv.kernel, inputs.dtype), (-1, filters))
    patch_mean = ops.mean(patches, axis=0)
    centred = patches - patch_mean
    count = ops.cast(ops.shape(patches)[0], inputs.dtype)
    covariance = ops.einsum("mi,mj->ij", centred, centred) / count  # no transposed copy
    mean = ops.matmul(patch_mean[None, :], kernel)[0]
    variance = ops.sum(kernel * ops.matmul(covariance, kernel), axis=0)
    update_moving_statistics(bn, mean, variance, inputs.dtype)
    factor = ops.rsqrt(variance + bn.epsilon) * ops.cast(bn.gamma, inputs.dtype)
    # The shift as one more input column of ones: one product, no pass to add it.
    centred = ops.concatenate([centred, ops.ones_like(centred[:, :1])], axis=1)
    folded = ops.concatenate([kernel * factor, ops.cast(bn.beta, inputs.dtype)[None]], 0)
    outputs = ops.matmul(centred, folded)
    return ops.reshape(outputs, (shape[0], shape[1], shape[2], filters))


# --------------------------------------------------------------------------------------
# TensorFlow kernels
# --------------------------------------------------------------------------------------


def fused_batch_norm_available(inputs):
    """Whether `fused_batch_norm_training` takes `inputs` (TensorFlow, NHWC, a float it has)."""
    return (
        keras.backend.backend() == "tensorflow"
        and len(inputs.shape) == 4
        and inputs.dtype in ("float32", "float16", "bfloat16")
    )


def fused_batch_norm_training(inputs, scale, offset, epsilon):
    """TensorFlow's fused training-mode BatchNorm over the last axis of NHWC `inputs`.

    One pass forward and one backward (oneDNN's kernels on CPU, cuDNN's on GPU), with
    registered second derivatives.

    Args:
        inputs: [N, H, W, C] float32, float16 or bfloat16.
        scale, offset: [C] float32, or None for ones / zeros.
        epsilon: added to the variance.

    Returns:
        (normalised inputs in their dtype, batch mean, biased batch variance), the
        statistics float32.
    """
    channels = inputs.shape[-1]
    scale = tf.ones((channels,), "float32") if scale is None else tf.cast(scale, "float32")
    offset = tf.zeros((channels,), "float32") if offset is None else tf.cast(offset, "float32")
    x = inputs
    if channels % 16 and inputs.dtype == "float32" and _cpu_only():
        # oneDNN's kernels are up to 2x faster on [N H W, 1, 1, C] than on [N, H, W, C] when
        # C is not a multiple of 16 (C = 72: forward 4.3 -> 2.0 ms, forward + backward
        # 6.7 -> 4.7 ms at 32x32x32); the statistics are over the same values.
        x = tf.reshape(inputs, (-1, 1, 1, channels))
    y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=scale,
        offset=offset,
        mean=tf.zeros((0,), "float32"),
        variance=tf.zeros((0,), "float32"),
        epsilon=epsilon,
        data_format="NHWC",
        is_training=True,
    )
    static = inputs.shape.is_fully_defined()
    if x is not inputs:
        y = tf.reshape(y, inputs.shape if static else tf.shape(inputs))
    # The kernel returns the unbiased variance (for a moving average); give the biased one.
    # One value per channel: the biased variance is 0 (a kernel may return inf or NaN).
    if static:
        # The same arithmetic with the count known when traced: two nodes instead of ten
        # (the search network's step has hundreds of these BatchNorms).
        count = float(math.prod(inputs.shape[:-1]))
        biased = variance * (count - 1.0) / count if count > 1.0 else tf.zeros_like(variance)
        return y, mean, biased
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), "float32")
    biased = tf.where(count > 1.0, variance * (count - 1.0) / tf.maximum(count, 1.0), 0.0)
    return y, mean, biased


def after(x, dependency):
    """`x`, usable by the operations that read it only once `dependency` is computed.

    A scheduling hint for TensorFlow graphs (a control dependency on an identity); elsewhere
    `x` itself. The numbers do not change.
    """
    if tf.executing_eagerly():
        return x
    with tf.control_dependencies([dependency]):
        return tf.identity(x)


@functools.cache
def _cpu_only():
    return not tf.config.list_logical_devices("GPU")


def depthwise_training_available(inputs, kernel_size, strides, dilation_rate):
    """Whether `depthwise_conv2d_training` takes this convolution.

    TensorFlow on a machine without GPUs (the kernels it avoids are oneDNN's), float32 NHWC
    of known size, odd kernels, and either stride 1 with a kernel of at least 5 (at 3x3
    oneDNN's own filter gradient is the faster) or stride 2 without dilation.
    """
    if keras.backend.backend() != "tensorflow" or len(inputs.shape) != 4:
        return False
    if inputs.dtype != "float32":  # the only type measured (oneDNN's kernels differ per type)
        return False
    if None in inputs.shape[1:] or not all(k % 2 for k in kernel_size):
        return False
    strides, rates = tuple(strides), tuple(dilation_rate)
    if strides == (1, 1) and len(set(rates)) == 1:
        usable = min(kernel_size) >= 5
    else:
        usable = strides == (2, 2) and rates == (1, 1)
    return usable and _cpu_only()


def depthwise_conv2d_training(inputs, kernel, strides=1, dilation_rate=1, pad=0):
    """A depthwise convolution for training on CPU, with faster oneDNN kernels or gradients.

    Two cases, the same numbers as TensorFlow's convolution (to rounding):
    - Stride 1, "same" padding, dilation d: the filter gradient,
      dW[i, j, c] = sum over n, h, w of x_padded[n, h + d i, w + d j, c] * dy[n, h, w, c],
      is computed as a depthwise convolution of the padded input with the batch moved into
      the channels ([1, H + d (K - 1), W + d (K - 1), N * C]) by the output gradient as an
      H x W filter at stride d, summed over the batch. oneDNN's own filter gradient of a
      5x5 or 7x7 depthwise convolution is ~2x slower than that. The input gradient is the
      convolution by the flipped kernel.
    - Stride 2 with PyTorch's symmetric padding `pad`: the forward pass and the filter
      gradient take the padding as an argument ("EXPLICIT") instead of a padded copy of the
      input: 2x faster forward and 1.4-3x faster filter gradients in oneDNN. The input
      gradient stays the "VALID" one on the padded size, cropped (oneDNN's explicit-padding
      input gradient is the slow one).
    Measurements in docs/performance.md.

    Args:
        inputs: [N, H, W, C] with known H, W and C.
        kernel: [K0, K1, C, 1], odd sizes.
        strides: 1 or 2 (the same along H and W).
        dilation_rate: d, at stride 1 only.
        pad: the symmetric padding of a stride-2 convolution (K // 2 for PyTorch's).

    Returns:
        The convolution: [N, H, W, C] at stride 1, [N, (H + 2 pad - K) // 2 + 1, ...] at 2.
    """
    stride = int(strides[0] if isinstance(strides, (tuple, list)) else strides)
    d = int(dilation_rate[0] if isinstance(dilation_rate, (tuple, list)) else dilation_rate)
    if stride == 1:
        return _depthwise_stride_1(inputs, kernel, d)
    return _depthwise_strided(inputs, kernel, stride, int(pad))


def _depthwise_stride_1(inputs, kernel, d):
    dilations = None if d == 1 else (d, d)

    @tf.custom_gradient
    def convolve(x, w):
        def grad(dy):
            _, height, width, channels = x.shape
            k0, k1 = w.shape[0], w.shape[1]
            flipped = tf.reverse(w, (0, 1))
            dx = tf.nn.depthwise_conv2d(dy, flipped, (1, 1, 1, 1), "SAME", dilations=dilations)
            pad0, pad1 = d * (k0 // 2), d * (k1 // 2)
            # Copied in the backward pass (a copy that needs only x would be made, and held,
            # during the forward pass: +11% peak memory in the search).
            padded = tf.pad(after(x, dy), [[0, 0], [pad0, pad0], [pad1, pad1], [0, 0]])
            # [N, H', W', C] -> [1, H', W', N * C]: each (sample, channel) is one channel.
            columns = tf.transpose(padded, (1, 2, 0, 3))
            columns = tf.reshape(columns, (1, height + 2 * pad0, width + 2 * pad1, -1))
            filters = tf.reshape(tf.transpose(dy, (1, 2, 0, 3)), (height, width, -1, 1))
            dw = tf.nn.depthwise_conv2d(columns, filters, (1, d, d, 1), "VALID")
            dw = tf.reduce_sum(tf.reshape(dw[:, :k0, :k1, :], (k0, k1, -1, channels)), axis=2)
            return dx, dw[..., None]

        return tf.nn.depthwise_conv2d(x, w, (1, 1, 1, 1), "SAME", dilations=dilations), grad

    return convolve(inputs, kernel)


def _depthwise_strided(inputs, kernel, stride, pad):
    strides = (1, stride, stride, 1)
    paddings = [[0, 0], [pad, pad], [pad, pad], [0, 0]]

    @tf.custom_gradient
    def convolve(x, w):
        def grad(dy):
            _, height, width, _ = x.shape
            padded_shape = tf.shape(x) + tf.constant([0, 2 * pad, 2 * pad, 0])
            dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                input_sizes=padded_shape,
                filter=w,
                out_backprop=dy,
                strides=strides,
                padding="VALID",
            )
            dx = dx[:, pad : pad + height, pad : pad + width, :]
            dw = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=x,
                filter_sizes=tf.shape(w),
                out_backprop=dy,
                strides=strides,
                padding="EXPLICIT",
                explicit_paddings=[value for pair in paddings for value in pair],
            )
            return dx, dw

        return tf.nn.depthwise_conv2d(x, w, strides, paddings), grad

    return convolve(inputs, kernel)
