"""NetworkCIFAR: the derived DARTS evaluation network, as a functional Keras model.

stem (3x3 conv, 3 -> 3C, BN) -> `layers` cells, reduction cells at layers//3 and
2*layers//3 doubling the channels (for layers=2 both cells reduce) -> global average pool
-> dense classifier, with DARTS' auxiliary head after cell 2*layers//3.

Reference:
    Liu et al., DARTS, arXiv 1806.09055; Ahmadian et al., arXiv 2301.01286 (Table 1).
"""

import keras
from keras import ops

from pibconv_tf.model import numerics as L
from pibconv_tf.model.cells import Cell
from pibconv_tf.model.genotypes import Genotype

STEM_MULTIPLIER = 3
LOGITS = "logits"
AUX_LOGITS = "aux_logits"


def reduction_indices(layers):
    """Indices of the reduction cells: layers//3 and 2*layers//3 (one cell if they meet)."""
    return sorted({layers // 3, 2 * layers // 3})


def cell_name(index):
    """Layer name of cell `index`; the last cell's output is GradCAM's default target."""
    return f"cell_{index}"


def stem_channels(model):
    """Output channels of the stem of a `network_cifar` model (3C).

    Models saved before the stem became one `ConvBatchNorm` layer ("stem") hold it as the
    layers "stem_conv" and "stem_bn"; both load and are read here.
    """
    names = {layer.name for layer in model.layers}
    return int(model.get_layer("stem" if "stem" in names else "stem_conv").filters)


def last_cell_name(model):
    """Name of the last cell of a network built by `network_cifar`."""
    cells = [layer.name for layer in model.layers if isinstance(layer, Cell)]
    if not cells:
        raise ValueError(f"Model {model.name!r} has no DARTS cells.")
    return max(cells, key=lambda name: int(name.rsplit("_", 1)[1]))


@keras.saving.register_keras_serializable(package="pibconv_tf")
class AuxiliaryHead(keras.layers.Layer):
    """DARTS' AuxiliaryHeadCIFAR: ReLU, 5x5/3 avg pool, 1x1 conv 128, BN, ReLU, 2x2 conv 768,
    BN, ReLU, dense.

    DARTS assumes an 8x8 input (32x32 images); for smaller maps the pool window and the
    second convolution shrink to the map so that the head still reduces to 1x1.

    Args:
        num_classes: classifier outputs.
        initializer: "torch" or "keras".
    """

    def __init__(self, num_classes, initializer="torch", **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.initializer = initializer
        self.conv_1 = L.conv2d(128, 1, 1, initializer, name="conv_1")
        self.bn_1 = L.batch_norm(True, name="bn_1")
        self.bn_2 = L.batch_norm(True, name="bn_2")
        self.conv_2 = None
        self.dense = L.dense(num_classes, 768, initializer, name="dense")

    def _pool(self, size):
        return min(5, size)

    def build(self, input_shape):
        height = input_shape[1]
        window = self._pool(height)
        pooled = (height - window) // 3 + 1
        self.conv_2 = keras.layers.Conv2D(
            768,
            min(2, pooled),
            padding="valid",
            use_bias=False,
            kernel_initializer=L.kernel_initializer(self.initializer),
            name="conv_2",
        )
        self.conv_1.build((None, pooled, pooled, input_shape[-1]))
        self.bn_1.build((None, pooled, pooled, 128))
        self.conv_2.build((None, pooled, pooled, 128))
        self.bn_2.build((None, None, None, 768))
        self.dense.build((None, 768))

    def call(self, inputs, training=None):
        window = self._pool(inputs.shape[1])
        x = ops.average_pool(ops.relu(inputs), window, 3, padding="valid")
        x = ops.relu(L.norm(self.bn_1, L.conv(self.conv_1, x, training), training))
        x = ops.relu(L.norm(self.bn_2, L.conv(self.conv_2, x, training), training))
        x = ops.mean(x, axis=(1, 2))
        return self.dense(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "initializer": self.initializer,
        }


def network_cifar(
    genotype,
    num_classes=10,
    init_channels=36,
    layers=20,
    auxiliary=False,
    image_size=32,
    initializer="torch",
    seed=None,
    name=None,
):
    """Builds DARTS' evaluation network for `genotype` (NetworkCIFAR).

    Args:
        genotype: a `Genotype`.
        num_classes: classifier outputs.
        init_channels: C, the channels of the first cells (36 in DARTS' evaluation).
        layers: number of cells (20 in DARTS; the paper's Table 1 sweeps 2..20).
        auxiliary: also output the auxiliary head's logits (training only).
        image_size: H = W of the (normalised) input images.
        initializer: "torch" (PyTorch's default, as DARTS) or "keras".
        seed: seed of drop path's random draws.
        name: model name.

    Returns:
        A functional `keras.Model` from [N, H, W, 3] images to logits, or to
        {"logits", "aux_logits"} when `auxiliary`. Cells are named `cell_{i}`.

    Example:
    >>> model = network_cifar(PIBCONV, layers=2, init_channels=8)
    >>> model(keras.ops.zeros((1, 32, 32, 3))).shape
    (1, 10)
    """
    if not isinstance(genotype, Genotype):
        raise TypeError(f"genotype must be a Genotype, got {type(genotype).__name__}.")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}.")
    inputs = keras.Input((image_size, image_size, 3), name="images")
    stem_channels = STEM_MULTIPLIER * init_channels
    x = L.ConvBatchNorm(stem_channels, 3, initializer, name="stem")(inputs)
    # Every cell starts by passing both inputs through a ReLU: it is computed once per state
    # here, for the two cells that read the state, instead of once in each.
    s1 = x
    r0 = r1 = keras.layers.ReLU(name="stem_relu")(x)
    filters, reduction_prev, aux_logits = init_channels, False, None
    reductions = reduction_indices(layers)
    for index in range(layers):
        reduction = index in reductions
        if reduction:
            filters *= 2
        cell = Cell(
            genotype,
            filters,
            reduction=reduction,
            reduction_prev=reduction_prev,
            initializer=initializer,
            seed=None if seed is None else seed + index,
            activated_inputs=True,
            name=cell_name(index),
        )
        s1 = cell([r0, r1])
        if index + 1 < layers:
            r0, r1 = r1, keras.layers.ReLU(name=f"{cell_name(index)}_relu")(s1)
        reduction_prev = reduction
        if auxiliary and index == 2 * layers // 3:
            aux_logits = AuxiliaryHead(num_classes, initializer, name="auxiliary_head")(s1)
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(s1)
    logits = L.dense(num_classes, x.shape[-1], initializer, name=LOGITS)(x)
    outputs = {LOGITS: logits, AUX_LOGITS: aux_logits} if auxiliary else logits
    return keras.Model(inputs, outputs, name=name or "network_cifar")


def inference_model(model):
    """The logits-only view of `model` (no auxiliary head), sharing its weights."""
    if isinstance(model.output, dict):
        return keras.Model(model.input, model.output[LOGITS], name=model.name)
    return model
