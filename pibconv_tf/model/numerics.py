"""Building blocks shared by every operation: PyTorch-faithful initialisation, norms, padding.

DARTS and PIBConv train with PyTorch's defaults, which differ from Keras' in three places
that change results: the kernel initialiser (uniform +-1/sqrt(fan_in)), BatchNorm's epsilon
and momentum (1e-5 and 0.1 in PyTorch's convention, i.e. a moving-average decay of 0.9), and
the padding of strided convolutions (symmetric in PyTorch, asymmetric "same" in TensorFlow).

The layers are Keras' own (`keras.layers.Conv2D`, `DepthwiseConv2D`, `BatchNormalization`,
`LayerNormalization`, `Dense`). Operations apply them through `norm`, `conv`, `depthwise`
and `gelu`, where `model.acceleration` may substitute a faster kernel of the same numbers in
training (`pibconv_tf.kernels`); what is computed, saved and restored does not depend on it.
"""

import contextlib
import math
import random

import keras
from keras import ops

from pibconv_tf.model import acceleration

INITIALIZERS = ("torch", "keras")
ACTIVATIONS = ("relu", "gelu")
NORMS = ("bn", "ln")

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Keras' decay; PyTorch's momentum=0.1 means the same moving average.
LN_EPSILON = 1e-6
_SQRT_HALF = math.sqrt(0.5)


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


_SYNCHRONIZED = [False]


def step_jit_compile(requested):
    """The `jit_compile` to compile a trainer with: on Keras' JAX backend always True (an
    uncompiled JAX step runs op by op, each primitive dispatched alone: tens of times
    slower than XLA's), elsewhere `requested` (--jit_compile)."""
    return True if keras.backend.backend() == "jax" else bool(requested)


@contextlib.contextmanager
def dtype_policy(name):
    """Sets Keras' global dtype policy (e.g. "mixed_float16"; None: float32) for the block."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name or "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def synchronized_batch_norm(enabled=True):
    """BatchNorm layers built in the block normalise by the statistics of the whole global
    batch (all replicas: Keras' `synchronized=True`) instead of each replica's own."""
    previous = _SYNCHRONIZED[0]
    _SYNCHRONIZED[0] = bool(enabled)
    try:
        yield
    finally:
        _SYNCHRONIZED[0] = previous


def batch_norm(affine, name, dtype=None):
    """BatchNorm with PyTorch's numerics; `affine=False` drops scale and centre (search).

    Keras' layer: the moving variance takes the biased batch variance (PyTorch's the unbiased
    one, a factor n / (n - 1) over n = batch x height x width values: 1.0005 at batch 32 and
    8x8). Inside `synchronized_batch_norm()`, the batch statistics are the global batch's.
    """
    return keras.layers.BatchNormalization(
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        center=affine,
        scale=affine,
        synchronized=_SYNCHRONIZED[0],
        name=name,
        dtype=dtype,
    )


def norm_layer(norm_kind, affine, name):
    """BatchNorm ("bn") or LayerNorm over channels ("ln", ConvNeXt's epsilon)."""
    check_choice("norm", norm_kind, NORMS)
    if norm_kind == "bn":
        return batch_norm(affine, name)
    return keras.layers.LayerNormalization(
        axis=-1, epsilon=LN_EPSILON, center=affine, scale=affine, name=name
    )


def accelerated(name, *args):
    """The kernel `name` applied to `args`, or None (switched off, absent, not applicable)."""
    fast = acceleration.kernel(name)
    return None if fast is None else fast(*args)


def norm(layer, x, training=None):
    """`layer(x, training=training)` for a norm layer; in training maybe a faster kernel."""
    if training and isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
        outputs = accelerated("batch_norm_training", layer, x)
        if outputs is not None:
            return outputs
    return layer(x, training=training)


def conv(layer, x, training=None):
    """`layer(x)` for a `Conv2D`; in training maybe a faster kernel (1x1: a matrix product).

    Stride-2 inputs are padded by `symmetric_pad` beforehand.
    """
    if training:
        outputs = accelerated("conv2d_training", layer, x)
        if outputs is not None:
            return outputs
    return layer(x)


def depthwise(layer, x, training=None, pad=0):
    """A `DepthwiseConv2D` with PyTorch's padding `pad` (symmetric; applied at stride 2).

    At stride 1 the layer's "same" padding is already symmetric for odd kernels.
    """
    if training:
        outputs = accelerated("depthwise_conv2d_training", layer, x, pad)
        if outputs is not None:
            return outputs
    return layer(symmetric_pad(x, layer.strides, pad))


def activation(x, name, training=None):
    """ReLU, or GELU with the exact erf form that PyTorch's `nn.GELU()` computes."""
    if name == "relu":
        return ops.relu(x)
    return gelu(x, training)


def gelu(x, training=None):
    """Exact GELU, x * Phi(x).

    In inference `ops.gelu`, which converters turn into one GELU operation; in training
    x * erfc(-x / sqrt 2) / 2, exact in the far left tail (as TensorFlow's own GELU is not
    to float64 precision), or a faster kernel.
    """
    if not training:
        return ops.gelu(x, approximate=False)
    outputs = accelerated("gelu_training", x)
    if outputs is not None:
        return outputs
    return x * (0.5 * ops.erfc(x * -_SQRT_HALF))


def after(x, dependency):
    """`x`; a scheduling kernel may make its readers wait for `dependency` (same numbers)."""
    outputs = accelerated("after", x, dependency)
    return x if outputs is None else outputs


def padding_mode(strides):
    """Stride 1: "same" is symmetric for odd kernels; stride 2 needs `symmetric_pad` first.

    TensorFlow's "same" pads a stride-2 convolution asymmetrically (nothing on top, one row
    at the bottom for even sizes), which shifts the sampling grid away from PyTorch's.
    """
    return "same" if max(_pair(strides)) == 1 else "valid"


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv2d(filters, kernel_size, strides, initializer, name, dilation_rate=1, groups=1, dtype=None):
    """A bias-free convolution; stride-2 inputs are padded by `symmetric_pad` beforehand."""
    return keras.layers.Conv2D(
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


def depthwise_conv2d(kernel_size, strides, initializer, name, dilation_rate=1):
    """A bias-free depthwise convolution, applied through `depthwise`."""
    return keras.layers.DepthwiseConv2D(
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
    """A bias-free KxK stride-1 convolution followed by BatchNorm: the network's stem.

    `bn(conv(x))`; in training a kernel may compute the two as one (`pibconv_tf.kernels`:
    the normalised output as one matrix product of the image patches).

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
        if training and self.bn.trainable:
            outputs = accelerated("conv_batch_norm_training", self, inputs)
            if outputs is not None:
                return outputs
        return norm(self.bn, conv(self.conv, inputs, training), training)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "initializer": self.initializer,
        }
