"""DARTS' search network: mixed operations, search cells and the network with its alphas.

stem (3x3 conv, 3 -> 3C, BN) -> `layers` search cells (reductions at layers//3 and
2*layers//3) -> global average pool -> dense classifier. Every cell of a kind shares one
architecture matrix: `alphas_normal` or `alphas_reduce`, [num_edges, num_ops] each.

With `partial_channels=K` > 1 the search is PC-DARTS': each edge sends 1/K of its channels
through the mixed operation and the rest around it, then shuffles the channels; each node
weights its incoming edges by a softmax over edge parameters (betas, `betas_normal` and
`betas_reduce`, architecture variables as the alphas), and the genotype is derived from the
alphas' softmax scaled by those edge weights.

Reference:
    Liu et al., DARTS, arXiv 1806.09055 (Sec. 2, `model_search.py`);
    Ahmadian et al., arXiv 2301.01286 (Sec. 3: the search setting);
    Xu et al., PC-DARTS, arXiv 1907.05737 (Sec. 3.2-3.3, `model_search.py`).
"""

import keras
import numpy as np
from keras import ops

from pibconv_tf.model import genotypes as genotypes_lib
from pibconv_tf.model import numerics as L
from pibconv_tf.model import operations, search_spaces
from pibconv_tf.model.networks import STEM_MULTIPLIER, reduction_indices

_REGISTER = keras.saving.register_keras_serializable(package="pibconv_tf")


@keras.saving.register_keras_serializable(package="pibconv_tf")
class MixedOp(keras.layers.Layer):
    """One edge of the search cell: sum_k w_k * op_k(x) over the space's operations.

    Every operation is built as in the search (`affine=False` norms). Where the space says so
    (`SearchSpace.pool_batch_norm`: the DARTS spaces), the pooling operations are followed by
    a BatchNorm without scale and centre, as in DARTS' MixedOp, so that their outputs live on
    the scale of the convolutions'; the PIBConv code's MixedOp (space `pibconv`) applies the
    pools alone. The `none` operation contributes
    w_none * 0 = 0 and its gradient with respect to every weight is zero, so it is not
    computed at all: the sum and all gradients are exactly DARTS' (w_none still takes its
    share of the softmax, which is where its architecture gradient comes from).

    With `partial_channels=K` > 1 (PC-DARTS), the operations see the first filters / K
    channels only; the other channels bypass them (max-pooled 2x2 on a stride-2 edge) and
    join their sum, and `channel_shuffle` interleaves the two parts for the next edge.

    Args:
        filters: input and output channels (C in the DARTS paper).
        strides: 1, or 2 on the edges that leave a reduction cell's inputs.
        search_space: name of a space in `ops.SEARCH_SPACES`, e.g. "pibconv".
        initializer: "torch" (PyTorch's default, as DARTS) or "keras".
        partial_channels: K, 1 for DARTS' edge.

    Call arguments:
        inputs: NHWC tensor with `filters` channels.
        weights: [num_ops] mixing weights, one per operation of the space in its order
            (a row of softmax(alpha)).
        training: whether BatchNorm uses batch statistics.

    Example:
    >>> op = MixedOp(filters=8, strides=1, search_space="darts")
    >>> w = keras.ops.softmax(keras.ops.zeros((8,)))
    >>> op(keras.ops.ones((2, 16, 16, 8)), w).shape
    (2, 16, 16, 8)

    Reference:
        Liu et al., DARTS, arXiv 1806.09055, Sec. 2.2.
    """

    def __init__(
        self,
        filters,
        strides=1,
        search_space="pibconv",
        initializer="torch",
        partial_channels=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if filters % partial_channels:
            raise ValueError(f"filters={filters} is not divisible by K={partial_channels}.")
        self.filters = filters
        self.strides = strides
        self.search_space = search_space
        self.initializer = initializer
        self.partial_channels = partial_channels
        channels = filters // partial_channels
        space = search_spaces.get_search_space(search_space)
        self.primitives = space.primitives
        self.candidates = []  # (column of the weights, op, BatchNorm after a pool or None)
        for index, op_name in enumerate(self.primitives):
            if op_name == "none":
                continue
            op = operations.make_op(
                op_name, channels, strides, False, search_space, initializer, name=op_name
            )
            pooled = space.pool_batch_norm and "pool" in op_name
            norm = L.batch_norm(False, name=f"{op_name}_bn") if pooled else None
            self.candidates.append((index, op, norm))
        # Optional callable (op, inputs, weights, training) -> outputs that computes
        # `forward` in a backend-specific way (e.g. one trace shared by all edges of the same
        # configuration); set by the trainer, never serialised.
        self.executor = None

    def build(self, inputs_shape, weights_shape):
        # The operations build their own weights at the first (eager) call; building them by
        # Keras' default, a symbolic trace of `call` per nesting level, takes minutes for the
        # 8-cell network.
        self.built = True

    def call(self, inputs, weights, training=None):
        if self.executor is not None:
            return self.executor(self, inputs, weights, training)
        return self.forward(inputs, weights, training)

    def forward(self, inputs, weights, training=None):
        """The mixed operation without the executor: `mixed_sum`, over the first C/K
        channels with partial channels (the rest bypass it, max-pooled at stride 2, and a
        channel shuffle interleaves the two). An executor runs all of it, so that with
        partial channels too an edge is one call that holds no copy of its input."""
        if self.partial_channels == 1:
            return self.mixed_sum(inputs, weights, training)
        part = self.filters // self.partial_channels
        through, around = inputs[..., :part], inputs[..., part:]
        if self.strides == 2:
            around = ops.max_pool(around, 2, 2, padding="same")
        outputs = ops.concatenate([self.mixed_sum(through, weights, training), around], axis=-1)
        return channel_shuffle(outputs, self.partial_channels)

    def mixed_sum(self, inputs, weights, training=None):
        """sum_k weights[k] * op_k(inputs), without the executor."""
        # Split once (one node, and one in the gradient) rather than indexed per operation.
        weights = ops.unstack(ops.cast(weights, inputs.dtype))
        total = None
        for index, op, norm in self.candidates:
            y = op(inputs, training=training)
            if norm is not None:
                y = L.norm(norm, y, training)
            y = weights[index] * y
            total = y if total is None else total + y
        return total

    def configuration(self):
        """What makes two MixedOps compute the same function of (inputs, weights, variables)."""
        return (
            self.filters,
            self.strides,
            self.search_space,
            self.initializer,
            self.partial_channels,
        )

    def compute_output_shape(self, input_shape):
        size = [None if s is None else (s + self.strides - 1) // self.strides for s in input_shape]
        return (input_shape[0], size[1], size[2], self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "strides": self.strides,
            "search_space": self.search_space,
            "initializer": self.initializer,
            "partial_channels": self.partial_channels,
        }


def channel_shuffle(inputs, groups):
    """ShuffleNet's channel shuffle on NHWC: channel g * (C / groups) + j moves to
    j * groups + g (PC-DARTS' `channel_shuffle`, written for NCHW)."""
    height, width, channels = inputs.shape[1:]
    x = ops.reshape(inputs, (-1, height, width, groups, channels // groups))
    x = ops.transpose(x, (0, 1, 2, 4, 3))
    return ops.reshape(x, (-1, height, width, channels))


def num_edges(steps):
    """Edges of a cell with `steps` nodes: node i reads the two inputs and i earlier nodes."""
    return sum(2 + node for node in range(steps))


@_REGISTER
class SearchCell(keras.layers.Layer):
    """A DARTS search cell: every edge is a `MixedOp`, every node sums its incoming edges.

    The cell inputs are first brought to `filters` channels without affine norms (a
    FactorizedReduce for the output of a reduction cell, else ReLU-1x1 conv-BN); node i sums
    the mixed operations on the two inputs and on nodes 0..i-1; the output concatenates the
    last `multiplier` nodes.

    Args:
        filters: channels of each node (C in the DARTS paper).
        reduction: whether the cell halves H and W (edges from the inputs have stride 2).
        reduction_prev: whether the previous cell reduced (C_{k-2} must then be halved).
        steps: number of intermediate nodes (4 in DARTS).
        multiplier: number of nodes concatenated as the output (4 in DARTS).
        search_space: name of the operation set.
        initializer: "torch" or "keras".
        partial_channels: K of PC-DARTS' partial channel connections (1: DARTS).

    Call arguments:
        inputs: [s0, s1], the outputs of cells k-2 and k-1.
        weights: [num_edges, num_ops] softmax(alpha) of this kind of cell.
        edge_weights: optional [num_edges] weights of the edges in their node's sum
            (PC-DARTS' edge normalisation); None sums the edges as DARTS does.
        training: whether BatchNorm uses batch statistics.

    Reference:
        Liu et al., DARTS, arXiv 1806.09055, Sec. 2.1.
    """

    def __init__(
        self,
        filters,
        reduction=False,
        reduction_prev=False,
        steps=4,
        multiplier=4,
        search_space="pibconv",
        initializer="torch",
        partial_channels=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = filters
        self.partial_channels = partial_channels
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.steps = steps
        self.multiplier = multiplier
        self.search_space = search_space
        self.initializer = initializer
        if reduction_prev:
            self.preprocess0 = operations.FactorizedReduce(filters, False, initializer, name="pre0")
        else:
            self.preprocess0 = operations.ReLUConvBN(
                filters, 1, 1, affine=False, initializer=initializer, name="pre0"
            )
        self.preprocess1 = operations.ReLUConvBN(
            filters, 1, 1, affine=False, initializer=initializer, name="pre1"
        )
        self.edges = []
        for node in range(steps):
            for source in range(2 + node):
                strides = 2 if reduction and source < 2 else 1
                name = f"edge_{len(self.edges)}"
                self.edges.append(
                    MixedOp(
                        filters, strides, search_space, initializer, partial_channels, name=name
                    )
                )

    def build(self, inputs_shape, weights_shape):
        # Sub-layers build at the first eager call (see `MixedOp.build`).
        self.built = True

    def call(self, inputs, weights, edge_weights=None, training=None):
        s0, s1 = inputs
        states = [self.preprocess0(s0, training=training), self.preprocess1(s1, training=training)]
        weights = _rows(weights)
        edge_weights = None if edge_weights is None else _rows(edge_weights)
        offset = 0
        for _ in range(self.steps):
            total = None
            for source, state in enumerate(states):
                h = self.edges[offset + source](state, weights[offset + source], training=training)
                if edge_weights is not None:
                    h = ops.cast(edge_weights[offset + source], h.dtype) * h
                total = h if total is None else total + h
            offset += len(states)
            states.append(total)
        return ops.concatenate(states[-self.multiplier :], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "steps": self.steps,
            "multiplier": self.multiplier,
            "search_space": self.search_space,
            "initializer": self.initializer,
            "partial_channels": self.partial_channels,
        }


@_REGISTER
class SearchNetwork(keras.Model):
    """DARTS' one-shot search model with explicit architecture variables.

    The two architecture matrices are properties of the model (`alphas_normal`,
    `alphas_reduce`; `arch_parameters()`), kept in float32 under mixed precision and
    softmaxed in float32; `weight_parameters()` lists every other trainable weight, in a
    fixed order. `genotype()` discretises softmax(alpha) as DARTS does.

    Args:
        num_classes: classifier outputs.
        init_channels: C, the channels of the first cells (16 in the DARTS / PIBConv search).
        layers: number of cells (8 in the search).
        steps: intermediate nodes per cell (4).
        multiplier: nodes concatenated as a cell's output (4).
        search_space: name of the operation set (`ops.SEARCH_SPACES`), "pibconv" by default.
        initializer: "torch" (PyTorch's default, as DARTS) or "keras".
        seed: optional seed of the alphas' initialisation (1e-3 * N(0, 1)).
        partial_channels: K of PC-DARTS (1: DARTS); with K > 1 the network also has the
            edge betas, [num_edges] per kind of cell, initialised as the alphas.

    Call arguments:
        inputs: normalised [N, H, W, 3] images.
        training: whether BatchNorm uses batch statistics (always True in the search).

    Example:
    >>> net = SearchNetwork(num_classes=10, init_channels=4, layers=3, steps=2, multiplier=2)
    >>> net(keras.ops.zeros((2, 16, 16, 3))).shape
    (2, 10)
    >>> net.genotype().search_space
    'pibconv'

    Reference:
        Liu et al., DARTS, arXiv 1806.09055; Ahmadian et al., arXiv 2301.01286.
    """

    def __init__(
        self,
        num_classes=10,
        init_channels=16,
        layers=8,
        steps=4,
        multiplier=4,
        search_space="pibconv",
        initializer="torch",
        seed=None,
        partial_channels=1,
        **kwargs,
    ):
        kwargs.setdefault("name", "search_network")
        super().__init__(**kwargs)
        if not 1 <= multiplier <= steps:
            raise ValueError(f"multiplier must be in 1..steps={steps}, got {multiplier}.")
        self.num_classes = num_classes
        self.init_channels = init_channels
        self.num_layers = layers
        self.steps = steps
        self.multiplier = multiplier
        self.search_space = search_space
        self.initializer = initializer
        self.seed = seed
        self.partial_channels = partial_channels
        if init_channels % partial_channels:
            raise ValueError(
                f"init_channels={init_channels} is not divisible by K={partial_channels}."
            )
        self.primitives = search_spaces.get_search_space(search_space).primitives
        stem_channels = STEM_MULTIPLIER * init_channels
        self.stem_conv = L.conv2d(stem_channels, 3, 1, initializer, name="stem_conv")
        self.stem_bn = L.batch_norm(True, name="stem_bn")
        self.cells = []
        filters, reduction_prev = init_channels, False
        for index in range(layers):
            reduction = index in reduction_indices(layers)
            filters = filters * 2 if reduction else filters
            cell = SearchCell(
                filters,
                reduction,
                reduction_prev,
                steps,
                multiplier,
                search_space,
                initializer,
                partial_channels,
                name=f"cell_{index}",
            )
            self.cells.append(cell)
            reduction_prev = reduction
        self.classifier = L.dense(num_classes, multiplier * filters, initializer, name="classifier")
        shape = (num_edges(steps), len(self.primitives))
        init = keras.initializers.RandomNormal(stddev=1e-3, seed=seed)
        # autocast=False: the alphas stay float32 under a mixed-precision policy.
        self._alphas_normal = self.add_weight(
            shape=shape, initializer=init, name="alphas_normal", autocast=False
        )
        init = keras.initializers.RandomNormal(stddev=1e-3, seed=None if seed is None else seed + 1)
        self._alphas_reduce = self.add_weight(
            shape=shape, initializer=init, name="alphas_reduce", autocast=False
        )
        self._betas = []
        if partial_channels > 1:
            for offset, kind in ((2, "normal"), (3, "reduce")):
                init = keras.initializers.RandomNormal(
                    stddev=1e-3, seed=None if seed is None else seed + offset
                )
                self._betas.append(
                    self.add_weight(
                        shape=shape[:1], initializer=init, name=f"betas_{kind}", autocast=False
                    )
                )

    @property
    def alphas_normal(self):
        """The normal cells' architecture variable, [num_edges, num_ops]."""
        return self._alphas_normal

    @property
    def alphas_reduce(self):
        """The reduction cells' architecture variable, [num_edges, num_ops]."""
        return self._alphas_reduce

    def arch_parameters(self):
        """[alphas_normal, alphas_reduce] (+ [betas_normal, betas_reduce] with partial
        channels): what the architecture optimiser updates."""
        return [self._alphas_normal, self._alphas_reduce, *self._betas]

    def alpha_parameters(self):
        """[alphas_normal, alphas_reduce], without PC-DARTS' betas."""
        return [self._alphas_normal, self._alphas_reduce]

    def weight_parameters(self):
        """Every trainable weight except the alphas: what the weight optimiser updates."""
        arch = {id(v) for v in self.arch_parameters()}
        return [v for v in self.trainable_weights if id(v) not in arch]

    def build(self, input_shape):
        # Weights are created by a first (eager) call; see `build_network`.
        self.built = True

    def call(self, inputs, training=None):
        # The rows (one per edge) split once here rather than sliced edge by edge in every
        # cell: one node per kind of cell in the graph, and in its gradient, instead of one
        # per edge (224 slices and their gradients' ~1,500 nodes in the paper's step).
        normal = _rows(ops.softmax(ops.convert_to_tensor(self._alphas_normal), axis=-1))
        reduce = _rows(ops.softmax(ops.convert_to_tensor(self._alphas_reduce), axis=-1))
        edges = {False: None, True: None}
        if self._betas:
            edges = {
                kind: _rows(node_softmax(ops.convert_to_tensor(betas), self.steps))
                for kind, betas in zip((False, True), self._betas, strict=True)
            }
        x = L.norm(self.stem_bn, L.conv(self.stem_conv, inputs, training), training)
        s0 = s1 = x
        for cell in self.cells:
            weights = reduce if cell.reduction else normal
            state = cell([s0, s1], weights, edges[cell.reduction], training=training)
            s0, s1 = s1, state
        x = ops.mean(s1, axis=(1, 2))
        return self.classifier(x)

    def arch_weights(self):
        """{"normal", "reduce"}: softmax(alpha) as float64 numpy arrays [num_edges, num_ops];
        with partial channels also {"normal_edges", "reduce_edges"}: the edges' weights in
        their node's sum, [num_edges] (per node a softmax of the betas)."""
        weights = {
            "normal": _softmax(self._alphas_normal),
            "reduce": _softmax(self._alphas_reduce),
        }
        if not self._betas:  # DARTS' edges (partial_channels=1)
            return weights
        for kind, betas in zip(("normal", "reduce"), self._betas, strict=True):
            values = np.asarray(keras.ops.convert_to_numpy(betas), np.float64)
            weights[f"{kind}_edges"] = _node_softmax_numpy(values, self.steps)
        return weights

    def derivation_weights(self):
        """{"normal", "reduce"}: what the genotype is derived from: softmax(alpha), each row
        scaled by its edge's weight under partial channels (PC-DARTS)."""
        weights = self.arch_weights()
        return {
            kind: weights[kind] * weights[f"{kind}_edges"][:, None]
            if f"{kind}_edges" in weights
            else weights[kind]
            for kind in ("normal", "reduce")
        }

    def genotype(self, max_skip=None):
        """DARTS' discretisation: per node the two strongest edges, each with its best non-none
        operation; the output concatenates the last `multiplier` nodes. `max_skip` limits the
        normal cell's skip connections (P-DARTS, `genotypes.derive_cell_with_skip_limit`)."""
        weights = self.derivation_weights()
        concat = tuple(range(2 + self.steps - self.multiplier, self.steps + 2))
        return genotypes_lib.Genotype(
            normal=genotypes_lib.derive_cell_with_skip_limit(
                weights["normal"], self.primitives, self.steps, max_skip
            ),
            normal_concat=concat,
            reduce=genotypes_lib.derive_cell(weights["reduce"], self.primitives, self.steps),
            reduce_concat=concat,
            search_space=self.search_space,
        )

    def get_config(self):
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "init_channels": self.init_channels,
            "layers": self.num_layers,
            "steps": self.steps,
            "multiplier": self.multiplier,
            "search_space": self.search_space,
            "initializer": self.initializer,
            "seed": self.seed,
            "partial_channels": self.partial_channels,
        }


def node_softmax(betas, steps):
    """[num_edges] edge weights: a softmax of `betas` over each node's incoming edges (node i
    has 2 + i), PC-DARTS' edge normalisation."""
    parts, start = [], 0
    for node in range(steps):
        parts.append(ops.softmax(betas[start : start + 2 + node], axis=-1))
        start += 2 + node
    return ops.concatenate(parts, axis=0)


def _node_softmax_numpy(betas, steps):
    parts, start = [], 0
    for node in range(steps):
        block = np.exp(betas[start : start + 2 + node] - betas[start : start + 2 + node].max())
        parts.append(block / block.sum())
        start += 2 + node
    return np.concatenate(parts)


def _softmax(variable):
    alpha = np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)
    alpha = np.exp(alpha - alpha.max(axis=-1, keepdims=True))
    return alpha / alpha.sum(axis=-1, keepdims=True)


def build_network(network, image_size):
    """Creates every weight of `network` with one eager call on a zero image; returns it."""
    network(ops.zeros((1, image_size, image_size, 3)), training=False)
    return network


def _rows(matrix):
    """`matrix` as a list of its rows (a list is returned as it is)."""
    if isinstance(matrix, (list, tuple)):
        return list(matrix)
    return ops.unstack(matrix, axis=0)


def set_op_executor(model, executor):
    """Routes every `MixedOp` of `model` through `executor` (None: plain Keras calls)."""
    mixed_ops = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, MixedOp)
    ]
    for op in mixed_ops:
        op.executor = executor
    return len(mixed_ops)
