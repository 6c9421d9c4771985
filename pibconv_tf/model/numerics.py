"""Building blocks shared by every operation: PyTorch-faithful initialisation, norms, padding.

DARTS and PIBConv train with PyTorch's defaults, which differ from Keras' in three places
that change results: the kernel initialiser (uniform +-1/sqrt(fan_in)), BatchNorm's epsilon
and momentum (1e-5 and 0.1 in PyTorch's convention, i.e. a moving-average decay of 0.9), and
the padding of strided convolutions (symmetric in PyTorch, asymmetric "same" in TensorFlow).

Three pieces here are faster forms of Keras' own in training, with the same weights and
numbers (docs/performance.md has the measurements): `Conv2D` computes a 1x1 stride-1
convolution as one matrix product over the pixels, `BatchNorm` takes TensorFlow's fused
kernel (or one pass over the batch where that kernel does not apply), and `gelu` has a
hand-written gradient.
"""

import math
import random

import keras
from keras import ops

from pibconv_tf.kernels import tensorflow_cpu as backend_kernels

INITIALIZERS = ("torch", "keras")
ACTIVATIONS = ("relu", "gelu")
NORMS = ("bn", "ln")

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Keras' decay; PyTorch's momentum=0.1 means the same moving average.
LN_EPSILON = 1e-6
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@keras.saving.register_keras_serializable(package="pibconv_tf")
class TorchUniform(keras.initializers.Initializer):
    """PyTorch's default kernel initialiser: uniform in +-1/sqrt(fan_in).

    `kaiming_uniform_(a=sqrt(5))`, which `nn.Conv2d` and `nn.Linear` use, reduces to this
    bound. fan_in is the number of inputs one output sees: kh*kw*(in/groups) for a
    convolution and kh*kw for a depthwise one (PyTorch stores depthwise weights as
    (C, 1, kh, kw)), which Keras' own variance-scaling initialisers get wrong for depthwise.

    Args:
        depthwise: whether the kernel is a depthwise kernel (kh, kw, C, multiplier).
        fan_in: explicit fan-in, for biases (PyTorch bounds a bias by its layer's fan-in).
        seed: optional integer seed.
    """

    def __init__(self, depthwise=False, fan_in=None, seed=None):
        self.depthwise = depthwise
        self.fan_in = fan_in
        self.seed = seed

    def __call__(self, shape, dtype=None):
        if self.fan_in is not None:
            fan_in = self.fan_in
        elif len(shape) == 2:
            fan_in = shape[0]
        elif self.depthwise:
            fan_in = math.prod(shape[:-2])
        else:
            fan_in = math.prod(shape[:-1])
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        # An integer seed drawn from Python's generator (which keras.utils.set_random_seed
        # seeds) keeps initialisation repeatable without a global Keras SeedGenerator.
        seed = self.seed if self.seed is not None else random.randint(0, 2**31 - 1)
        return keras.random.uniform(shape, -bound, bound, dtype=dtype, seed=seed)

    def get_config(self):
        return {"depthwise": self.depthwise, "fan_in": self.fan_in, "seed": self.seed}


def check_choice(kind, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {kind} {value!r}; expected one of {', '.join(choices)}.")


def kernel_initializer(initializer, depthwise=False):
    """The kernel initialiser named `initializer` ("torch" or "keras")."""
    check_choice("initializer", initializer, INITIALIZERS)
    if initializer == "torch":
        return TorchUniform(depthwise=depthwise)
    return "glorot_uniform"


@keras.saving.register_keras_serializable(package="pibconv_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` that trains with a fused or a one-pass kernel.

    In training, NHWC images of float32, float16 or bfloat16 take TensorFlow's fused
    BatchNorm kernel (one pass forward, one backward; oneDNN on CPU): forward + backward in
    1.5x less time than the one-pass form below, and its registered second derivatives
    agree with that form's. Other inputs (float64, other ranks, other backends) take one
    pass of their own: the batch mean and (biased) variance come from E[x] and
    E[x^2] - E[x]^2 computed together, and the normalisation is one multiply-add with
    per-channel factors; Keras' `moments` reads the batch twice and its gradient carries
    broadcasts of both. The difference of moments is exact enough for activations whose
    mean is not orders of magnitude above their spread, which BatchNorm's own inputs are.
    Statistics are float32 for float16 inputs, as in Keras, and the moving variance takes
    the biased batch variance on both paths, as Keras' does (PyTorch's takes the unbiased
    one: a factor n / (n - 1) over n = batch x height x width values, 1.0005 at batch 32
    and 8x8). Inference, masks, renormalisation and synchronised statistics are Keras' code.

    Args:
        Those of `keras.layers.BatchNormalization` (`batch_norm` sets PyTorch's epsilon and
        momentum).

    Call arguments:
        inputs: a tensor whose last axis is normalised.
        training: use (and record) the batch statistics.
        mask: as in Keras (its path).
    """

    def call(self, inputs, training=None, mask=None):
        if (
            not (training and self.trainable)
            or mask is not None
            or self.renorm
            or self.synchronized
            or self.axis not in (-1, len(inputs.shape) - 1)
        ):
            return super().call(inputs, training=training, mask=mask)
        if backend_kernels.fused_batch_norm_available(inputs):
            return self._fused_call(inputs)
        dtype = "float32" if inputs.dtype in ("float16", "bfloat16") else inputs.dtype
        x = ops.cast(inputs, dtype)
        axes = tuple(range(len(x.shape) - 1))
        mean = ops.mean(x, axis=axes)
        variance = ops.maximum(ops.mean(ops.square(x), axis=axes) - ops.square(mean), 0.0)
        self._update_moving_statistics(mean, variance, dtype)
        factor = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            factor = factor * ops.cast(self.gamma, dtype)
        shift = -mean * factor
        if self.center:
            shift = shift + ops.cast(self.beta, dtype)
        return ops.cast(x * factor + shift, self.compute_dtype)

    def _fused_call(self, inputs):
        y, mean, variance = backend_kernels.fused_batch_norm_training(
            inputs,
            self.gamma if self.scale else None,
            self.beta if self.center else None,
            self.epsilon,
        )
        self._update_moving_statistics(mean, variance, "float32")
        return ops.cast(y, self.compute_dtype)

    def _update_moving_statistics(self, mean, variance, dtype):
        decay = self.momentum
        self.moving_mean.assign(ops.cast(self.moving_mean, dtype) * decay + mean * (1 - decay))
        self.moving_variance.assign(
            ops.cast(self.moving_variance, dtype) * decay + variance * (1 - decay)
        )


def batch_norm(affine, name, dtype=None):
    """BatchNorm with PyTorch's numerics; `affine=False` drops scale and centre (search)."""
    return BatchNorm(
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        center=affine,
        scale=affine,
        name=name,
        dtype=dtype,
    )


def norm_layer(norm, affine, name):
    """BatchNorm ("bn") or LayerNorm over channels ("ln", ConvNeXt's epsilon)."""
    check_choice("norm", norm, NORMS)
    if norm == "bn":
        return batch_norm(affine, name)
    return keras.layers.LayerNormalization(
        axis=-1, epsilon=LN_EPSILON, center=affine, scale=affine, name=name
    )


def activation(x, name, training=None):
    """ReLU, or GELU with the exact erf form that PyTorch's `nn.GELU()` computes."""
    if name == "relu":
        return ops.relu(x)
    return gelu(x, training)


def gelu(x, training=None):
    """Exact GELU, x * Phi(x); in training with a hand-written gradient.

    The gradient Phi(x) + x * phi(x) reuses the forward's Phi(x): forward and backward take
    ~30% less time on CPU than differentiating `ops.gelu`'s graph (whose gradient
    recomputes erf's pieces). It is itself differentiable, so second derivatives hold.
    Outside training it is `ops.gelu`, which converters turn into one GELU operation.
    """
    if not training:
        return ops.gelu(x, approximate=False)
    return _gelu_with_gradient(x)


@ops.custom_gradient
def _gelu_with_gradient(x):
    cdf = 0.5 * ops.erfc(x * -_SQRT_HALF)  # TensorFlow's form: exact in the far left tail

    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        density = ops.exp(-0.5 * ops.square(x)) * _INV_SQRT_2PI
        return upstream * (cdf + x * density)

    return x * cdf, grad


def padding_mode(strides):
    """Stride 1: "same" is symmetric for odd kernels; stride 2 needs `symmetric_pad` first.

    TensorFlow's "same" pads a stride-2 convolution asymmetrically (nothing on top, one row
    at the bottom for even sizes), which shifts the sampling grid away from PyTorch's.
    """
    return "same" if max(_pair(strides)) == 1 else "valid"


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def pointwise(x, kernel, training=None):
    """A 1x1 stride-1 convolution of NHWC `x` with `kernel` (1, 1, C_in, C_out).

    In training it is one matrix product over the pixels, whose forward and backward pass
    take ~15-20% less time on CPU than a 1x1 `Conv2D`'s; in inference it stays a
    convolution, which converters fold a following BatchNorm into.
    """
    if not training:
        return ops.conv(x, kernel, strides=1, padding="valid")
    shape = ops.shape(x)
    y = ops.matmul(ops.reshape(x, (-1, kernel.shape[2])), ops.reshape(kernel, kernel.shape[2:]))
    return ops.reshape(y, (shape[0], shape[1], shape[2], kernel.shape[3]))


@keras.saving.register_keras_serializable(package="pibconv_tf")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` that trains a 1x1 stride-1 convolution as a matrix product.

    Same weights, configuration and numbers as Keras' layer; see `pointwise`. Other
    kernels, strides, dilations and groups are Keras' convolution.

    Args:
        Those of `keras.layers.Conv2D`.

    Call arguments:
        inputs: NHWC tensor.
        training: whether the 1x1 case takes the training (matrix product) form.
    """

    def call(self, inputs, training=None):
        plain = (self.kernel_size, self.strides, self.dilation_rate) == ((1, 1),) * 3
        plain = plain and self.groups == 1 and self.data_format == "channels_last"
        if not (plain and training and not self.use_bias):
            return super().call(inputs)
        outputs = pointwise(inputs, ops.cast(self.kernel, inputs.dtype), training)
        return outputs if self.activation is None else self.activation(outputs)


def conv2d(filters, kernel_size, strides, initializer, name, dilation_rate=1, groups=1, dtype=None):
    """A bias-free convolution; stride-2 inputs are padded by `symmetric_pad` beforehand."""
    return Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding_mode(strides),
        dilation_rate=dilation_rate,
        groups=groups,
        use_bias=False,
        kernel_initializer=kernel_initializer(initializer),
        name=name,
        dtype=dtype,
    )


@keras.saving.register_keras_serializable(package="pibconv_tf")
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` with PyTorch's padding and faster CPU training kernels.

    Same weights, configuration and numbers as Keras' layer. A strided convolution pads its
    input symmetrically by the call argument `pad` first (PyTorch's `padding=`; the layer is
    built "valid" for strides above 1, see `padding_mode`). In training on a CPU-only
    TensorFlow, `backend_kernels.depthwise_conv2d_training` takes stride-1 convolutions with
    kernels of 5 or more and stride-2 ones without dilation (faster oneDNN kernels and
    gradients); everything else is Keras' convolution.

    Args:
        Those of `keras.layers.DepthwiseConv2D`.

    Call arguments:
        inputs: NHWC tensor.
        training: whether the training kernels may be taken.
        pad: symmetric padding of H and W before a strided convolution (ignored at stride 1,
            whose "same" padding is already symmetric for odd kernels).
    """

    def call(self, inputs, training=None, pad=0):
        if training and self._fast(inputs):
            kernel = ops.cast(self.kernel, inputs.dtype)
            outputs = backend_kernels.depthwise_conv2d_training(
                inputs, kernel, self.strides, self.dilation_rate, pad
            )
            return outputs if self.activation is None else self.activation(outputs)
        return super().call(symmetric_pad(inputs, self.strides, pad))

    def compute_output_spec(self, inputs, training=None, pad=0):
        shape = list(inputs.shape)
        if pad and padding_mode(self.strides) == "valid":
            shape[1:3] = [None if n is None else n + 2 * pad for n in shape[1:3]]
        return keras.KerasTensor(self.compute_output_shape(tuple(shape)), self.compute_dtype)

    def _fast(self, inputs):
        plain = not self.use_bias and self.depth_multiplier == 1
        plain = plain and self.data_format == "channels_last"
        plain = plain and self.padding == padding_mode(self.strides)
        return plain and backend_kernels.depthwise_training_available(
            inputs, self.kernel_size, self.strides, self.dilation_rate
        )


def depthwise_conv2d(kernel_size, strides, initializer, name, dilation_rate=1):
    return DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding=padding_mode(strides),
        dilation_rate=dilation_rate,
        use_bias=False,
        depthwise_initializer=kernel_initializer(initializer, depthwise=True),
        name=name,
    )


def symmetric_pad(x, strides, pad_h, pad_w=None, value=0.0):
    """Pads H by `pad_h` and W by `pad_w` on both sides (PyTorch's `padding=`) if strided.

    At stride 1 the layers use "same" padding, which is already symmetric, so nothing is
    padded here.
    """
    pad_w = pad_h if pad_w is None else pad_w
    if padding_mode(strides) == "same" or (pad_h == 0 and pad_w == 0):
        return x
    return ops.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]], constant_values=value)


def dense(units, fan_in, initializer, name):
    """A classifier layer with PyTorch's `nn.Linear` initialisation of kernel and bias."""
    if initializer == "torch":
        kernel, bias = TorchUniform(), TorchUniform(fan_in=fan_in)
    else:
        kernel, bias = kernel_initializer(initializer), "zeros"
    return keras.layers.Dense(units, kernel_initializer=kernel, bias_initializer=bias, name=name)


def build_sublayers(*pairs):
    """Builds each (layer, input_channels) pair; convolutions and norms need only channels."""
    for layer, channels in pairs:
        layer.build((None, None, None, channels))


@keras.saving.register_keras_serializable(package="pibconv_tf")
class ConvBatchNorm(keras.layers.Layer):
    """A bias-free KxK stride-1 convolution followed by BatchNorm, trained as one product.

    In inference (and for float16 / bfloat16 inputs) it is the two layers `conv` and `bn`.
    In training, a convolution of few input channels (the network's stem: 3x3 over RGB, 27
    values per pixel) is rewritten exactly: with P the N*H*W x K*K*C_in image patches, the
    convolution is P @ W, so its batch mean is mean(P) @ W and its batch variance
    diag(W^T cov(P) W), where cov(P) is only K*K*C_in square. The normalised output is then
    one matrix product of the centred patches by W scaled per channel, plus the shift: the
    convolution's and BatchNorm's passes over the N*H*W x C_out output (forward and
    backward) become one matrix product each way. Same weights, moving statistics and
    numbers (to rounding) as `conv` then `bn`.

    Args:
        filters: output channels.
        kernel_size: K (odd; "same" padding).
        initializer: "torch" or "keras" (the convolution's kernel).

    Call arguments:
        inputs: NHWC tensor.
        training: use (and record) the batch statistics.
    """

    def __init__(self, filters, kernel_size=3, initializer="torch", **kwargs):
        super().__init__(**kwargs)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}.")
        self.filters = filters
        self.kernel_size = kernel_size
        self.initializer = initializer
        # The sublayers follow this layer's dtype policy (Keras does not pass it down).
        self.conv = conv2d(filters, kernel_size, 1, initializer, "conv", dtype=self.dtype_policy)
        self.bn = batch_norm(True, name="bn", dtype=self.dtype_policy)

    def build(self, input_shape):
        build_sublayers((self.conv, input_shape[-1]), (self.bn, self.filters))

    def call(self, inputs, training=None):
        if not (training and self.bn.trainable) or inputs.dtype not in ("float32", "float64"):
            return self.bn(self.conv(inputs), training=training)
        k = self.kernel_size
        shape = ops.shape(inputs)
        patches = ops.image.extract_patches(inputs, (k, k), strides=(1, 1), padding="same")
        patches = ops.reshape(patches, (-1, k * k * inputs.shape[-1]))
        kernel = ops.reshape(ops.cast(self.conv.kernel, inputs.dtype), (-1, self.filters))
        patch_mean = ops.mean(patches, axis=0)
        centred = patches - patch_mean
        count = ops.cast(ops.shape(patches)[0], inputs.dtype)
        covariance = ops.einsum("mi,mj->ij", centred, centred) / count  # no transposed copy
        mean = ops.matmul(patch_mean[None, :], kernel)[0]
        variance = ops.sum(kernel * ops.matmul(covariance, kernel), axis=0)
        self.bn._update_moving_statistics(mean, variance, inputs.dtype)
        factor = ops.rsqrt(variance + self.bn.epsilon) * ops.cast(self.bn.gamma, inputs.dtype)
        # The shift as one more input column of ones: one product, no pass to add it.
        centred = ops.concatenate([centred, ops.ones_like(centred[:, :1])], axis=1)
        folded = ops.concatenate([kernel * factor, ops.cast(self.bn.beta, inputs.dtype)[None]], 0)
        outputs = ops.matmul(centred, folded)
        return ops.reshape(outputs, (shape[0], shape[1], shape[2], self.filters))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "initializer": self.initializer,
        }
