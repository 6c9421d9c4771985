"""Fast kernels of one backend that the backend-agnostic layers use where it is active.

The model modules (layers, ops, cells, ...) import keras only; a kernel that Keras does not
expose lives here, behind a check of the active backend, and the layer keeps its portable
form for the other backends.
"""

import keras


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
    import tensorflow as tf  # noqa: PLC0415 (this backend's kernel, loaded when used)

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
    y = tf.reshape(y, tf.shape(inputs)) if x is not inputs else y
    # The kernel returns the unbiased variance (for a moving average); give the biased one.
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), "float32")
    # One value per channel: the biased variance is 0 (a kernel may return inf or NaN).
    biased = tf.where(count > 1.0, variance * (count - 1.0) / tf.maximum(count, 1.0), 0.0)
    return y, mean, biased


def after(x, dependency):
    """`x`, usable by the operations that read it only once `dependency` is computed.

    A scheduling hint for TensorFlow graphs (a control dependency on an identity); elsewhere
    `x` itself. The numbers do not change.
    """
    if keras.backend.backend() != "tensorflow":
        return x
    import tensorflow as tf  # noqa: PLC0415

    if tf.executing_eagerly():
        return x
    with tf.control_dependencies([dependency]):
        return tf.identity(x)


def _cpu_only():
    import tensorflow as tf  # noqa: PLC0415

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
    import tensorflow as tf  # noqa: PLC0415

    stride = int(strides[0] if isinstance(strides, (tuple, list)) else strides)
    d = int(dilation_rate[0] if isinstance(dilation_rate, (tuple, list)) else dilation_rate)
    if stride == 1:
        return _depthwise_stride_1(tf, inputs, kernel, d)
    return _depthwise_strided(tf, inputs, kernel, stride, int(pad))


def _depthwise_stride_1(tf, inputs, kernel, d):
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


def _depthwise_strided(tf, inputs, kernel, stride, pad):
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
