"""The Pseudo-Inverted Bottleneck convolution (PIBConv) and the ConvNeXt block it descends from.

Reference:
    Ahmadian et al., Pseudo-Inverted Bottleneck Convolution for DARTS Search Space,
    arXiv 2301.01286 (Fig. 2b and 2c, Eq. 1 and 2).
"""

import keras
from keras import ops

from pibconv_tf.model import numerics as L

IMPLEMENTATIONS = ("depthwise", "grouped")


@keras.saving.register_keras_serializable(package="pibconv_tf")
class PIBConv(keras.layers.Layer):
    """Pseudo-Inverted Bottleneck convolution block.

    depthwise kxk (stride s) -> BatchNorm -> 1x1 conv C -> F*C -> grouped kxk conv
    F*C -> C (groups = C) -> GELU -> 1x1 conv C -> C, without biases. It holds
    (F+1)C^2 + (1+F)K^2 C weights (+2C for an affine BatchNorm) against the ConvNeXt inverted
    bottleneck's 2FC^2 + K^2 C: about 0.63x at the same F = 4 ((F+1)/2F), and 3C^2 against
    8C^2 with the paper's final F = 2. (The paper's Eq. 2 writes 2K^2 C, counting the grouped
    convolution as if it were depthwise.)

    The grouped convolution's kernel is stored in Keras' `Conv2D(groups=C)` layout
    (k, k, F, C), and computed one of two ways with identical numbers:
    - "depthwise": a depthwise convolution over the F*C expanded channels followed by a sum
      over each group of F channels (`_grouped_conv`; the graph the TFLite export starts
      from). TensorFlow's grouped convolution has no fused CPU kernel and trains two orders
      of magnitude slower. In training, `pibconv_tf.kernels` may compute the expansion and
      the grouped convolution together as F branches summed (the same numbers).
    - "grouped": the 1x1 expansion, then a grouped convolution (`ops.conv` with the
      (k, k, F, C) kernel); it maps to one TFLite CONV_2D.

    Args:
        filters: input and output channels (C).
        kernel_size: K, the size of both spatial kernels (3, 5 or 7).
        strides: stride of the first depthwise convolution (2 in reduction cells).
        affine: BatchNorm with learnable scale and centre (False during search).
        expansion: F, the pseudo-inverted bottleneck ratio (2 in the paper).
        implementation: "depthwise" or "grouped" (see above).
        initializer: "torch" (PyTorch's default, as the authors' code) or "keras".

    Call arguments:
        inputs: NHWC tensor with `filters` channels.
        training: whether BatchNorm uses batch statistics.

    Example:
    >>> block = PIBConv(filters=8, kernel_size=3)
    >>> block(keras.ops.ones((2, 16, 16, 8))).shape
    (2, 16, 16, 8)

    Reference:
        Ahmadian et al., arXiv 2301.01286, Fig. 2c.
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        strides=1,
        affine=True,
        expansion=2,
        implementation="depthwise",
        initializer="torch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        L.check_choice("implementation", implementation, IMPLEMENTATIONS)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.affine = affine
        self.expansion = expansion
        self.implementation = implementation
        self.initializer = initializer
        self.dw = L.depthwise_conv2d(kernel_size, strides, initializer, name="dw")
        self.bn = L.batch_norm(affine, name="bn")
        self.pw_expand = L.conv2d(expansion * filters, 1, 1, initializer, name="pw_expand")
        self.pw_project = L.conv2d(filters, 1, 1, initializer, name="pw_project")

    def build(self, input_shape):
        c, f = input_shape[-1], self.filters
        L.build_sublayers((self.dw, c), (self.bn, c), (self.pw_expand, c), (self.pw_project, f))
        self.grouped_kernel = self.add_weight(
            name="grouped_kernel",
            shape=(self.kernel_size, self.kernel_size, self.expansion, f),
            initializer=L.kernel_initializer(self.initializer),
        )

    def call(self, inputs, training=None):
        x = L.depthwise(self.dw, inputs, training, self.kernel_size // 2)
        x = L.norm(self.bn, x, training)
        grouped = None
        if training and self.implementation == "depthwise":
            grouped = L.accelerated("pib_conv_expand_group", self, x)
        if grouped is None:
            grouped = self._grouped_conv(L.conv(self.pw_expand, x, training))
        x = L.gelu(grouped, training)
        return L.conv(self.pw_project, x, training)

    def _grouped_conv(self, x):
        kernel = ops.cast(self.grouped_kernel, x.dtype)
        if self.implementation == "grouped":
            return ops.conv(x, kernel, strides=1, padding="same")
        k, f, c = self.kernel_size, self.expansion, self.filters
        # Input channel f*g + i of group g meets kernel[:, :, i, g].
        depthwise = ops.reshape(ops.transpose(kernel, (0, 1, 3, 2)), (k, k, c * f, 1))
        y = ops.depthwise_conv(x, depthwise, strides=1, padding="same")
        shape = ops.shape(y)
        y = ops.reshape(y, (-1, shape[1], shape[2], c, f))
        return ops.sum(y, axis=-1)

    def compute_output_shape(self, input_shape):
        def down(size):
            return None if size is None else (size + self.strides - 1) // self.strides

        return (input_shape[0], down(input_shape[1]), down(input_shape[2]), self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "affine": self.affine,
            "expansion": self.expansion,
            "implementation": self.implementation,
            "initializer": self.initializer,
        }


@keras.saving.register_keras_serializable(package="pibconv_tf")
class ConvNeXtBlock(keras.layers.Layer):
    """The ConvNeXt inverted bottleneck as a DARTS operation (no residual, no biases).

    depthwise kxk (stride s) -> norm -> 1x1 C -> F*C -> GELU -> 1x1 F*C -> C, F = 4:
    2FC^2 + K^2 C weights (the paper's Eq. 1), the roadmap stage before PIBConv.

    Args:
        filters: input and output channels (C).
        kernel_size: K (3, 5 or 7).
        strides: stride of the depthwise convolution.
        affine: learnable norm scale and centre.
        expansion: F (4 in ConvNeXt).
        norm: "bn" (the paper keeps BatchNorm) or "ln".
        initializer: "torch" or "keras".

    Reference:
        Liu et al., A ConvNet for the 2020s, arXiv 2201.03545; PIBConv paper Fig. 2b.
    """

    def __init__(
        self,
        filters,
        kernel_size=7,
        strides=1,
        affine=True,
        expansion=4,
        norm="bn",
        initializer="torch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.affine = affine
        self.expansion = expansion
        self.norm = norm
        self.initializer = initializer
        self.dw = L.depthwise_conv2d(kernel_size, strides, initializer, name="dw")
        self.norm_layer = L.norm_layer(norm, affine, name="norm")
        self.pw_expand = L.conv2d(expansion * filters, 1, 1, initializer, name="pw_expand")
        self.pw_project = L.conv2d(filters, 1, 1, initializer, name="pw_project")

    def build(self, input_shape):
        c = input_shape[-1]
        L.build_sublayers(
            (self.dw, c),
            (self.norm_layer, c),
            (self.pw_expand, c),
            (self.pw_project, self.expansion * self.filters),
        )

    def call(self, inputs, training=None):
        x = L.depthwise(self.dw, inputs, training, self.kernel_size // 2)
        x = L.norm(self.norm_layer, x, training)
        x = L.gelu(L.conv(self.pw_expand, x, training), training)
        return L.conv(self.pw_project, x, training)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "affine": self.affine,
            "expansion": self.expansion,
            "norm": self.norm,
            "initializer": self.initializer,
        }


def set_implementation(model, implementation):
    """Switches every PIBConv in `model` to `implementation` before it is traced again."""
    L.check_choice("implementation", implementation, IMPLEMENTATIONS)
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, PIBConv):
            layer.implementation = implementation
            count += 1
    return count
