"""Parameter and multiply-accumulate (MAC) counts, as the paper's Table 1 reports them.

Convention (that of ptflops, the PyTorch counter the PIBConv authors used): convolutions
count out_H * out_W * out_C * k_h * k_w * in_C / groups MACs, dense layers in * out + out;
BatchNorm counts one per element (two when affine), LayerNorm likewise, ReLU/GELU one per
output element, pooling one per input element; additions, concatenation, padding, zero and
identity operations count nothing. `conv_dense_gmacs` leaves out the elementwise terms.
Parameters are the trainable weights without the auxiliary head (training-only).
"""

import dataclasses

import keras
import numpy as np

from pibconv_tf.model import operations
from pibconv_tf.model.cells import Cell
from pibconv_tf.model.pib_conv import ConvNeXtBlock, PIBConv


@dataclasses.dataclass
class _Count:
    conv_dense: int = 0
    elementwise: int = 0

    def conv(self, out_hw, out_channels, kernel_area, in_per_group):
        self.conv_dense += out_hw * out_channels * kernel_area * in_per_group

    def norm(self, numel, affine):
        self.elementwise += numel * (2 if affine else 1)

    def add(self, numel):
        self.elementwise += numel


def _down(size, strides):
    return (size + strides - 1) // strides


def _sep_family(count, op, h, w, c):
    """SepConv, DilConv, Conv7x1_1x7 and ReLUConvBN on an (h, w, c) input."""
    s, k, f = op.strides, op.kernel_size, op.filters
    ho, wo = _down(h, s), _down(w, s)
    count.add(h * w * c)  # activation
    if isinstance(op, operations.Conv7x1_1x7):
        count.conv(h * wo, f, k, c)
        count.conv(ho * wo, f, k, f)
    elif isinstance(op, operations.ReLUConvBN):
        count.conv(ho * wo, f, k * k, c)
    else:  # SepConv / DilConv: depthwise then pointwise
        count.conv(ho * wo, c, k * k, 1)
        count.conv(ho * wo, f, 1, c)
    count.norm(ho * wo * f, op.affine)
    if isinstance(op, operations.SepConv):
        count.add(ho * wo * f)
        count.conv(ho * wo, f, k * k, 1)
        count.conv(ho * wo, f, 1, f)
        count.norm(ho * wo * f, op.affine)
    return ho, wo, f


def _bottleneck(count, op, h, w, c):
    """PIBConv and the ConvNeXt block."""
    s, k, f, e = op.strides, op.kernel_size, op.filters, op.expansion
    ho, wo = _down(h, s), _down(w, s)
    hw = ho * wo
    count.conv(hw, c, k * k, 1)
    count.norm(hw * c, op.affine)
    count.conv(hw, e * c, 1, c)
    if isinstance(op, PIBConv):
        count.conv(hw, f, k * k, e)  # grouped: each output sees `e` inputs
        count.add(hw * f)
    else:
        count.add(hw * e * c)
    count.conv(hw, f, 1, e * c if isinstance(op, ConvNeXtBlock) else f)
    return ho, wo, f


def op_count(count, op, shape):
    """Adds the MACs of operation `op` on an (h, w, c) input; returns its output shape."""
    h, w, c = shape
    if isinstance(
        op, (operations.SepConv, operations.DilConv, operations.Conv7x1_1x7, operations.ReLUConvBN)
    ):
        return _sep_family(count, op, h, w, c)
    if isinstance(op, (PIBConv, ConvNeXtBlock)):
        return _bottleneck(count, op, h, w, c)
    if isinstance(op, operations.FactorizedReduce):
        ho, wo = _down(h, 2), _down(w, 2)
        count.add(h * w * c)
        count.conv(ho * wo, op.filters, 1, c)
        count.norm(ho * wo * op.filters, op.affine)
        return ho, wo, op.filters
    if isinstance(op, operations.Pool3x3):
        count.add(h * w * c)
        return _down(h, op.strides), _down(w, op.strides), c
    if isinstance(op, operations.Zero):
        return _down(h, op.strides), _down(w, op.strides), c
    if isinstance(op, operations.Identity):
        return shape
    raise TypeError(f"No MAC count for operation {type(op).__name__}.")


def cell_count(count, cell, shape0, shape1):
    """Adds the MACs of a derived `Cell` given its two input shapes; returns its output shape."""
    states = [op_count(count, cell.preprocess0, shape0), op_count(count, cell.preprocess1, shape1)]
    for node in range(len(cell.edges) // 2):
        outputs = [
            op_count(count, cell.edge_ops[p], states[cell.edges[p][1]])
            for p in (2 * node, 2 * node + 1)
        ]
        states.append(outputs[0])
    h, w, _ = states[-1]
    return h, w, sum(states[i][2] for i in cell.concat)


def _shape(tensor):
    return tuple(int(d) for d in tensor.shape[1:])


def model_complexity(model):
    """Parameters and GMACs of one image through a `networks.network_cifar` model.

    Returns:
        {"params": trainable weights without the auxiliary head, "gmacs": the ptflops-style
        total, "conv_dense_gmacs": convolutions and dense layers only}.
    """
    count = _Count()
    for layer in model.layers:
        name = type(layer).__name__
        if isinstance(layer, Cell):
            shape0, shape1 = (_shape(t) for t in layer.input)
            cell_count(count, layer, shape0, shape1)
        elif name == "Conv2D":
            h, w, c_out = _shape(layer.output)
            kh, kw = layer.kernel_size
            count.conv(h * w, c_out, kh * kw, _shape(layer.input)[-1] // layer.groups)
        elif name == "ConvBatchNorm":  # the stem
            h, w, c_out = _shape(layer.output)
            count.conv(h * w, c_out, layer.kernel_size**2, _shape(layer.input)[-1])
            count.norm(h * w * c_out, True)
        elif isinstance(layer, keras.layers.BatchNormalization):  # ours too (older stems)
            count.norm(int(np.prod(_shape(layer.input))), layer.scale or layer.center)
        elif name == "GlobalAveragePooling2D":
            count.add(int(np.prod(_shape(layer.input))))
        elif name == "Dense":
            units_in = _shape(layer.input)[-1]
            count.conv_dense += units_in * layer.units + (layer.units if layer.use_bias else 0)
    params = sum(
        int(np.prod(v.shape))
        for layer in model.layers
        if type(layer).__name__ != "AuxiliaryHead"
        for v in layer.trainable_weights
    )
    return {
        "params": params,
        "gmacs": (count.conv_dense + count.elementwise) / 1e9,
        "conv_dense_gmacs": count.conv_dense / 1e9,
    }
