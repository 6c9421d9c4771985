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
    y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs,
        scale=scale,
        offset=offset,
        mean=tf.zeros((0,), "float32"),
        variance=tf.zeros((0,), "float32"),
        epsilon=epsilon,
        data_format="NHWC",
        is_training=True,
    )
    # The kernel returns the unbiased variance (for a moving average); give the biased one.
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), "float32")
    # One value per channel: the biased variance is 0 (a kernel may return inf or NaN).
    biased = tf.where(count > 1.0, variance * (count - 1.0) / tf.maximum(count, 1.0), 0.0)
    return y, mean, biased
