"""PyTorch reference forward passes of the DARTS / PIBConv operations, fed Keras' weights.

Each function re-states the authors' PyTorch definition with `torch.nn.functional`, reading
the weights of one of our Keras layers (converted from NHWC kernels to PyTorch's layout), so
the tests can check that our layers compute exactly what the PyTorch code computes.
"""

import numpy as np
import torch
import torch.nn.functional as F

from pibconv_tf.model import operations
from pibconv_tf.model.pib_conv import ConvNeXtBlock, PIBConv


def to_torch(x_nhwc):
    return torch.tensor(np.asarray(x_nhwc).transpose(0, 3, 1, 2), dtype=torch.float64)


def to_nhwc(x_nchw):
    return x_nchw.detach().numpy().transpose(0, 2, 3, 1)


def _t(array):
    return torch.tensor(np.asarray(array), dtype=torch.float64)


def conv(x, layer, stride=1, padding=0, dilation=1, groups=1):
    kernel = layer.kernel.numpy().transpose(3, 2, 0, 1)  # (kh, kw, in/g, out) -> (out, in/g, ..)
    return F.conv2d(x, _t(kernel), None, stride, padding, dilation, groups)


def depthwise(x, layer, stride=1, padding=0, dilation=1):
    kernel = layer.kernel.numpy().transpose(2, 3, 0, 1)  # (kh, kw, C, 1) -> (C, 1, kh, kw)
    return F.conv2d(x, _t(kernel), None, stride, padding, dilation, groups=x.shape[1])


def norm(x, layer, training):
    if type(layer).__name__ == "LayerNormalization":
        y = x.permute(0, 2, 3, 1)
        gamma = _t(layer.gamma.numpy()) if layer.scale else None
        beta = _t(layer.beta.numpy()) if layer.center else None
        y = F.layer_norm(y, (y.shape[-1],), gamma, beta, eps=layer.epsilon)
        return y.permute(0, 3, 1, 2)
    gamma = _t(layer.gamma.numpy()) if layer.scale else None
    beta = _t(layer.beta.numpy()) if layer.center else None
    mean, var = _t(layer.moving_mean.numpy()), _t(layer.moving_variance.numpy())
    return F.batch_norm(x, mean, var, gamma, beta, training, 0.1, 1e-5)


def act(x, name):
    return F.relu(x) if name == "relu" else F.gelu(x)


def reference(op, x, training=False):
    """The PyTorch computation of our Keras operation `op` on NCHW float64 tensor `x`."""
    if isinstance(op, operations.Zero):
        return x[:, :, :: op.strides, :: op.strides].mul(0.0)
    if isinstance(op, operations.Identity):
        return x
    if isinstance(op, operations.Pool3x3):
        if op.pool_type == "max":
            return F.max_pool2d(x, 3, op.strides, 1)
        return F.avg_pool2d(x, 3, op.strides, 1, count_include_pad=False)
    if isinstance(op, operations.FactorizedReduce):
        x = F.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        y = torch.cat([conv(x, op.conv_1, 2), conv(shifted, op.conv_2, 2)], dim=1)
        return norm(y, op.bn, training)
    if isinstance(op, operations.ReLUConvBN):
        y = conv(act(x, op.activation), op.conv, op.strides, op.kernel_size // 2)
        return norm(y, op.bn, training)
    if isinstance(op, operations.SepConv):
        k, s = op.kernel_size, op.strides
        y = depthwise(act(x, op.activation), op.dw_1, s, k // 2)
        y = norm(conv(y, op.pw_1), op.norm_1, training)
        y = depthwise(act(y, op.activation), op.dw_2, 1, k // 2)
        return norm(conv(y, op.pw_2), op.norm_2, training)
    if isinstance(op, operations.DilConv):
        k, s, d = op.kernel_size, op.strides, op.dilation_rate
        y = depthwise(act(x, op.activation), op.dw, s, d * (k - 1) // 2, d)
        return norm(conv(y, op.pw), op.bn, training)
    if isinstance(op, operations.Conv7x1_1x7):
        s = op.strides
        y = conv(act(x, op.activation), op.conv_1xk, (1, s), (0, 3))
        y = conv(y, op.conv_kx1, (s, 1), (3, 0))
        return norm(y, op.bn, training)
    if isinstance(op, PIBConv):
        k, c = op.kernel_size, op.filters
        y = norm(depthwise(x, op.dw, op.strides, k // 2), op.bn, training)
        y = conv(y, op.pw_expand)
        grouped = op.grouped_kernel.numpy().transpose(3, 2, 0, 1)  # (C, F, k, k)
        y = F.gelu(F.conv2d(y, _t(grouped), None, 1, k // 2, 1, groups=c))
        return conv(y, op.pw_project)
    if isinstance(op, ConvNeXtBlock):
        k = op.kernel_size
        y = norm(depthwise(x, op.dw, op.strides, k // 2), op.norm_layer, training)
        return conv(F.gelu(conv(y, op.pw_expand)), op.pw_project)
    raise TypeError(f"no reference for {type(op).__name__}")
