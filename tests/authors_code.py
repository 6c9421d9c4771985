"""The authors' released PyTorch networks, re-stated, and a binding to our Keras weights.

github.com/mahdihosseini/PIBConv, `cnn/`: the operations (`operations.py`), the derived
network (`model.py`: Cell, AuxiliaryHeadCIFAR, NetworkCIFAR) and the search network
(`model_search.py`: MixedOp, Cell, Network), written again here (not copied) with the same
modules, the same order of operations and the same numerics, so that a test can give both
implementations the same weights and compare logits and gradients. What the released code
does, and this module with it:
- `dil_conv_*` and `conv_7x1_1x7` start with a ReLU in every space (`DilConv`, the
  `conv_7x1_1x7` Sequential); only `PseudoInvBn` (our PIBConv) has a GELU.
- The PIBConv search's `MixedOp` applies the pools alone; DARTS' follows each pool by a
  BatchNorm(affine=False) (`pool_batch_norm`).
- The auxiliary head starts with `ReLU(inplace=True)`: in training mode, when the head sits
  on the last cell (2 and 3 layers), the classifier then pools relu(last cell).
  `AuxiliaryHeadCIFAR(inplace=False)` is the form our network computes (and theirs in
  evaluation mode, where the head is not run).

Only torch is imported here (the benchmarks' PyTorch timings build these networks too);
`bind_*` read the Keras layers they are given (their `.numpy()`).
"""

import collections

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

STEM_MULTIPLIER = 3

Genotype = collections.namedtuple("Genotype", "normal normal_concat reduce reduce_concat")
# The paper's Fig. 4 genotype as the released genotypes.py lists it (tests/test_authors_parity
# checks it against ours).
PIBCONV = Genotype(
    normal=[
        ("pib_conv_3x3", 0),
        ("pib_conv_5x5", 1),
        ("pib_conv_3x3", 0),
        ("pib_conv_3x3", 2),
        ("pib_conv_3x3", 2),
        ("pib_conv_3x3", 1),
        ("pib_conv_3x3", 1),
        ("pib_conv_3x3", 3),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("avg_pool_3x3", 0),
        ("pib_conv_5x5", 1),
        ("avg_pool_3x3", 0),
        ("dil_conv_5x5", 2),
        ("avg_pool_3x3", 0),
        ("skip_connect", 2),
        ("pib_conv_3x3", 3),
        ("pib_conv_3x3", 0),
    ],
    reduce_concat=[2, 3, 4, 5],
)

# The ten operations of the PIBConv search, in the column order of our alphas.
PIBCONV_PRIMITIVES = (
    "none",
    "skip_connect",
    "pib_conv_3x3",
    "pib_conv_5x5",
    "pib_conv_7x7",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "conv_7x1_1x7",
    "max_pool_3x3",
    "avg_pool_3x3",
)
DARTS_PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


# --------------------------------------------------------------------------------------
# Operations (cnn/operations.py)
# --------------------------------------------------------------------------------------


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Identity(nn.Module):
    def forward(self, x):
        return x


class ReLUConvBN(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class FactorizedReduce(nn.Module):
    """ReLU, 1x1 stride-2 convs of x and of x shifted by a pixel (zero-padded on odd
    sizes), concatenated, BatchNorm."""

    def __init__(self, c_in, c_out, affine=True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        shifted = x[:, :, 1:, 1:]
        if x.shape[2] % 2:
            shifted = F.pad(shifted, (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class SepConv(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, padding=0, bias=False),
            nn.BatchNorm2d(c_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, 1, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, padding=0, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, c_in, c_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride, padding, dilation, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, padding=0, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


def conv_7x1_1x7(c, stride, affine):
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(c, c, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(c, c, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(c, affine=affine),
    )


class PseudoInvBn(nn.Module):
    """depthwise kxk (stride s), BN, 1x1 C -> 2C, grouped kxk 2C -> C (groups C), GELU,
    1x1 C -> C."""

    def __init__(self, c_in, c_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, kernel_size, stride, padding, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in, affine=affine),
            nn.Conv2d(c_in, 2 * c_in, 1, padding=0, bias=False),
            nn.Conv2d(2 * c_in, c_in, kernel_size, 1, padding, groups=c_in, bias=False),
            nn.GELU(),
            nn.Conv2d(c_in, c_out, 1, padding=0, bias=False),
        )

    def forward(self, x):
        return self.op(x)


def make_op(name, c, stride, affine, pib_conv=None):
    """`OPS[name](C, stride, affine)` of the released code; `pib_conv` replaces the
    PseudoInvBn class (the benchmarks time another form of its grouped convolution)."""
    if name == "none":
        return Zero(stride)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(c, c, affine=affine)
    if name == "conv_7x1_1x7":
        return conv_7x1_1x7(c, stride, affine)
    kernel = int(name.rsplit("_", 1)[1].split("x")[0])
    if name.startswith("sep_conv"):
        return SepConv(c, c, kernel, stride, kernel // 2, affine=affine)
    if name.startswith("dil_conv"):
        return DilConv(c, c, kernel, stride, kernel - 1, 2, affine=affine)
    if name.startswith("pib_conv"):
        return (pib_conv or PseudoInvBn)(c, c, kernel, stride, kernel // 2, affine=affine)
    raise ValueError(f"operation {name!r} is not in the released code")


# --------------------------------------------------------------------------------------
# The derived network (cnn/model.py)
# --------------------------------------------------------------------------------------


def drop_path(x, drop_prob):
    """utils.drop_path, out of place: one Bernoulli(1 - p) mask value per sample."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class Cell(nn.Module):
    def __init__(self, genotype, c_prev_prev, c_prev, c, reduction, reduction_prev, **op):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, c)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self.concat)
        self.indices = [index for _, index in edges]
        self._ops = nn.ModuleList(
            make_op(name, c, 2 if reduction and index < 2 else 1, True, **op)
            for name, index in edges
        )

    def forward(self, s0, s1, drop_prob=0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self._ops) // 2):
            pair = []
            for position in (2 * node, 2 * node + 1):
                op = self._ops[position]
                h = op(states[self.indices[position]])
                if self.training and drop_prob > 0.0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                pair.append(h)
            states.append(pair[0] + pair[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """For an 8x8 input; `inplace=True` is the released code's first ReLU."""

    def __init__(self, c, num_classes, inplace=True):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=inplace),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(c, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class NetworkCIFAR(nn.Module):
    def __init__(
        self, c, num_classes, layers, auxiliary, genotype, inplace_aux_relu=True, pib_conv=None
    ):
        super().__init__()
        self.layers = layers
        self.auxiliary = auxiliary
        self.drop_path_prob = 0.0
        c_curr = STEM_MULTIPLIER * c
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, c
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cell = Cell(
                genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, pib_conv=pib_conv
            )
            reduction_prev = reduction
            self.cells.append(cell)
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == 2 * layers // 3:
                c_to_auxiliary = c_prev
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(
                c_to_auxiliary, num_classes, inplace=inplace_aux_relu
            )
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x):
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self.layers // 3 and self.auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1)), logits_aux


# --------------------------------------------------------------------------------------
# The search network (cnn/model_search.py)
# --------------------------------------------------------------------------------------


class MixedOp(nn.Module):
    """`skip_none` leaves out `none` (w * 0; ours skips it too), for the benchmarks."""

    def __init__(self, c, stride, primitives, pool_batch_norm, skip_none=False):
        super().__init__()
        self._ops = nn.ModuleList()
        self.columns = []
        for column, primitive in enumerate(primitives):
            if skip_none and primitive == "none":
                continue
            op = make_op(primitive, c, stride, False)
            if pool_batch_norm and "pool" in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(c, affine=False))
            self._ops.append(op)
            self.columns.append(column)

    def forward(self, x, weights):
        return sum(weights[c] * op(x) for c, op in zip(self.columns, self._ops, strict=True))


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, c_prev_prev, c_prev, c, reduction, reduction_prev, **op):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(c_prev_prev, c, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0, affine=False)
        self.steps, self.multiplier = steps, multiplier
        self._ops = nn.ModuleList(
            MixedOp(c, 2 if reduction and j < 2 else 1, **op)
            for i in range(steps)
            for j in range(2 + i)
        )

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier :], dim=1)


class SearchNetwork(nn.Module):
    """`model_search.Network`; the alphas are plain tensors (set them with `bind`)."""

    def __init__(
        self,
        c,
        num_classes,
        layers,
        steps=4,
        multiplier=4,
        primitives=PIBCONV_PRIMITIVES,
        pool_batch_norm=False,
        skip_none=False,
    ):
        super().__init__()
        self.primitives = tuple(primitives)
        self.pool_batch_norm, self.skip_none = pool_batch_norm, skip_none
        c_curr = STEM_MULTIPLIER * c
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, c
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            self.cells.append(
                SearchCell(
                    steps,
                    multiplier,
                    c_prev_prev,
                    c_prev,
                    c_curr,
                    reduction,
                    reduction_prev,
                    primitives=self.primitives,
                    pool_batch_norm=pool_batch_norm,
                    skip_none=skip_none,
                )
            )
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)
        edges = sum(2 + i for i in range(steps))
        self.alphas_normal = torch.zeros(edges, len(self.primitives), requires_grad=True)
        self.alphas_reduce = torch.zeros(edges, len(self.primitives), requires_grad=True)

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            alphas = self.alphas_reduce if cell.reduction else self.alphas_normal
            s0, s1 = s1, cell(s0, s1, F.softmax(alphas, dim=-1))
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))


# --------------------------------------------------------------------------------------
# Binding our Keras weights to these modules
# --------------------------------------------------------------------------------------


class Binding:
    """Pairs of (Keras variable, torch tensor) with the layout change between them.

    `load()` copies every Keras value into its tensor; `keras_gradient(i, g)` puts a Keras
    gradient of pair i into the torch layout, for comparison with `tensor.grad`.
    """

    def __init__(self, dtype=torch.float64):
        self.dtype = dtype
        self.pairs = []  # (keras variable, torch tensor, permutation or None)

    def add(self, variable, tensor, permutation=None):
        self.pairs.append((variable, tensor, permutation))

    def to_torch(self, value, permutation):
        value = np.asarray(value)
        return torch.tensor(value if permutation is None else value.transpose(permutation))

    def load(self):
        with torch.no_grad():
            for variable, tensor, permutation in self.pairs:
                value = self.to_torch(variable.numpy(), permutation).to(tensor.dtype)
                if value.shape != tensor.shape:
                    raise ValueError(f"{variable.path}: {tuple(value.shape)} vs {tensor.shape}")
                tensor.copy_(value)
        return self


_CONV = (3, 2, 0, 1)  # Keras (kh, kw, in / groups, out) -> torch (out, in / groups, kh, kw)
_DEPTHWISE = (2, 3, 0, 1)  # Keras (kh, kw, C, 1) -> torch (C, 1, kh, kw)


def _conv(binding, keras_conv, torch_conv, depthwise=False):
    binding.add(keras_conv.kernel, torch_conv.weight, _DEPTHWISE if depthwise else _CONV)


def _bn(binding, keras_bn, torch_bn):
    if keras_bn.scale:
        binding.add(keras_bn.gamma, torch_bn.weight)
    if keras_bn.center:
        binding.add(keras_bn.beta, torch_bn.bias)
    binding.add(keras_bn.moving_mean, torch_bn.running_mean)
    binding.add(keras_bn.moving_variance, torch_bn.running_var)


def _dense(binding, keras_dense, torch_linear):
    binding.add(keras_dense.kernel, torch_linear.weight, (1, 0))
    binding.add(keras_dense.bias, torch_linear.bias)


def bind_op(binding, keras_op, torch_op):
    """Adds the weights of one of our operations and its released counterpart."""
    kind = type(keras_op).__name__
    if kind in ("Zero", "Identity", "Pool3x3"):
        return
    if kind == "FactorizedReduce":
        _conv(binding, keras_op.conv_1, torch_op.conv_1)
        _conv(binding, keras_op.conv_2, torch_op.conv_2)
        _bn(binding, keras_op.bn, torch_op.bn)
    elif kind == "ReLUConvBN":
        _conv(binding, keras_op.conv, torch_op.op[1])
        _bn(binding, keras_op.bn, torch_op.op[2])
    elif kind == "SepConv":
        seq = torch_op.op
        _conv(binding, keras_op.dw_1, seq[1], depthwise=True)
        _conv(binding, keras_op.pw_1, seq[2])
        _bn(binding, keras_op.norm_1, seq[3])
        _conv(binding, keras_op.dw_2, seq[5], depthwise=True)
        _conv(binding, keras_op.pw_2, seq[6])
        _bn(binding, keras_op.norm_2, seq[7])
    elif kind == "DilConv":
        seq = torch_op.op
        _conv(binding, keras_op.dw, seq[1], depthwise=True)
        _conv(binding, keras_op.pw, seq[2])
        _bn(binding, keras_op.bn, seq[3])
    elif kind == "Conv7x1_1x7":
        _conv(binding, keras_op.conv_1xk, torch_op[1])
        _conv(binding, keras_op.conv_kx1, torch_op[2])
        _bn(binding, keras_op.bn, torch_op[3])
    elif kind == "PIBConv":
        seq = torch_op.op
        _conv(binding, keras_op.dw, seq[0], depthwise=True)
        _bn(binding, keras_op.bn, seq[1])
        _conv(binding, keras_op.pw_expand, seq[2])
        # Keras' grouped kernel (k, k, F, C) -> torch (C, F, k, k): group g reads expanded
        # channels F*g .. F*g + F - 1 in both.
        binding.add(keras_op.grouped_kernel, seq[3].weight, (3, 2, 0, 1))
        _conv(binding, keras_op.pw_project, seq[5])
    else:
        raise TypeError(f"no binding for {kind}")


def _stem(binding, keras_conv, keras_bn, torch_stem):
    _conv(binding, keras_conv, torch_stem[0])
    _bn(binding, keras_bn, torch_stem[1])


def bind_mixed_op(binding, keras_op, torch_op):
    """Adds the weights of our `MixedOp` and a released `MixedOp` of the same space."""
    ours = {column: (op, norm) for column, op, norm in keras_op.candidates}
    for column, torch_candidate in zip(torch_op.columns, torch_op._ops, strict=True):
        if column not in ours:  # `none`: no weights
            continue
        op, norm = ours[column]
        if norm is not None:
            bind_op(binding, op, torch_candidate[0])
            _bn(binding, norm, torch_candidate[1])
        else:
            bind_op(binding, op, torch_candidate)


def bind_network(keras_model, torch_model, dtype=torch.float64):
    """Binds a `networks.network_cifar` model to a `NetworkCIFAR` of the same shape."""
    torch_model.to(dtype)
    binding = Binding(dtype)
    stem = keras_model.get_layer("stem")
    _stem(binding, stem.conv, stem.bn, torch_model.stem)
    for index, torch_cell in enumerate(torch_model.cells):
        cell = keras_model.get_layer(f"cell_{index}")
        bind_op(binding, cell.preprocess0, torch_cell.preprocess0)
        bind_op(binding, cell.preprocess1, torch_cell.preprocess1)
        for keras_op, torch_op in zip(cell.edge_ops, torch_cell._ops, strict=True):
            bind_op(binding, keras_op, torch_op)
    if torch_model.auxiliary:
        head, torch_head = keras_model.get_layer("auxiliary_head"), torch_model.auxiliary_head
        _conv(binding, head.conv_1, torch_head.features[2])
        _bn(binding, head.bn_1, torch_head.features[3])
        _conv(binding, head.conv_2, torch_head.features[5])
        _bn(binding, head.bn_2, torch_head.features[6])
        _dense(binding, head.dense, torch_head.classifier)
    _dense(binding, keras_model.get_layer("logits"), torch_model.classifier)
    return binding.load()


def bind_search_network(keras_network, torch_network, dtype=torch.float64):
    """Binds a `SearchNetwork` (its alphas included) to a `SearchNetwork` here."""
    torch_network.to(dtype)
    with torch.no_grad():
        for name in ("alphas_normal", "alphas_reduce"):
            setattr(torch_network, name, getattr(torch_network, name).to(dtype).detach())
            getattr(torch_network, name).requires_grad_(True)
    binding = Binding(dtype)
    _stem(binding, keras_network.stem_conv, keras_network.stem_bn, torch_network.stem)
    for keras_cell, torch_cell in zip(keras_network.cells, torch_network.cells, strict=True):
        bind_op(binding, keras_cell.preprocess0, torch_cell.preprocess0)
        bind_op(binding, keras_cell.preprocess1, torch_cell.preprocess1)
        for keras_edge, torch_edge in zip(keras_cell.edges, torch_cell._ops, strict=True):
            bind_mixed_op(binding, keras_edge, torch_edge)
    _dense(binding, keras_network.classifier, torch_network.classifier)
    # The alphas: ours hold the space's column order, which the torch network shares.
    binding.add(keras_network.alphas_normal, torch_network.alphas_normal)
    binding.add(keras_network.alphas_reduce, torch_network.alphas_reduce)
    return binding.load()
