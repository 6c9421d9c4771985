"""The derived DARTS cell, built from a genotype, and drop path.

Reference:
    Liu et al., DARTS, arXiv 1806.09055 (Sec. 2.1 and the CIFAR-10 evaluation network).
"""

import keras
from keras import ops

from pibconv_tf.model import numerics as L
from pibconv_tf.model import operations, search_spaces
from pibconv_tf.model.genotypes import Genotype

# Operations without weights: two edges applying the same one to the same state agree.
_WEIGHT_FREE = (operations.Pool3x3, operations.Identity, operations.Zero)


def drop_path(x, rate, seed_generator):
    """Zeroes whole samples with probability `rate` and rescales the rest by 1/(1-rate).

    DARTS' drop path: one Bernoulli(1 - rate) draw per sample, shared over H, W and C.
    """
    keep = 1.0 - ops.cast(rate, "float32")
    shape = (ops.shape(x)[0], 1, 1, 1)
    mask = ops.cast(keras.random.uniform(shape, seed=seed_generator) < keep, x.dtype)
    # One pass over x: the per-sample factor (0 or 1/keep) is formed first.
    return x * (mask / ops.cast(keep, x.dtype))


@keras.saving.register_keras_serializable(package="pibconv_tf")
class Cell(keras.layers.Layer):
    """A normal or reduction cell of the derived network.

    Both inputs are preprocessed to `filters` channels (FactorizedReduce for the output of a
    reduction cell, else ReLU-1x1 conv-BN); each node sums two operations applied to earlier
    states; the output concatenates the `concat` states. In training, drop path is applied to
    every operation output except identities, at the rate held by the `drop_path_rate`
    variable (set per epoch with `set_drop_path_rate`).

    Args:
        genotype: a `Genotype` or its dict form.
        filters: channels of each node (C in the DARTS paper).
        reduction: whether this cell halves H and W (edges from the inputs have stride 2).
        reduction_prev: whether the previous cell was a reduction cell (C_{k-2} must then be
            halved).
        initializer: "torch" or "keras" kernel initialisation.
        activated_inputs: the inputs come already through the ReLU that both preprocessing
            operations start with (a network computes it once per state, for the two cells
            that read it); the cell then does not apply it again.
        activations: {kind: "relu" | "gelu"} of the convolution kinds (`ops.CONV_KINDS`);
            None takes those of the genotype's search space. The config records them, so a
            saved model keeps computing what it computed if a space's definition changes.

    Call arguments:
        inputs: [s0, s1], the outputs of cells k-2 and k-1 (C_{k-2}, C_{k-1}), or their
            ReLUs with `activated_inputs`.
        training: whether BatchNorm uses batch statistics and drop path is active.
    """

    def __init__(
        self,
        genotype,
        filters,
        reduction=False,
        reduction_prev=False,
        initializer="torch",
        seed=None,
        activated_inputs=False,
        activations=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(genotype, dict):
            genotype = Genotype.from_dict(genotype)
        if activations is None:
            activations = search_spaces.get_search_space(genotype.search_space).activation_map()
        self.activations = dict(activations)
        self.genotype = genotype
        self.filters = filters
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.initializer = initializer
        self.seed = seed
        self.activated_inputs = activated_inputs
        activate = not activated_inputs
        cell = "reduce" if reduction else "normal"
        self.edges = getattr(genotype, cell)
        self.concat = getattr(genotype, f"{cell}_concat")
        if reduction_prev:
            self.preprocess0 = operations.FactorizedReduce(
                filters, True, initializer, activate=activate, name="pre0"
            )
        else:
            self.preprocess0 = operations.ReLUConvBN(
                filters, 1, 1, activate=activate, initializer=initializer, name="pre0"
            )
        self.preprocess1 = operations.ReLUConvBN(
            filters, 1, 1, activate=activate, initializer=initializer, name="pre1"
        )
        self.edge_ops = []
        for position, (op_name, index) in enumerate(self.edges):
            strides = 2 if reduction and index < 2 else 1
            op = operations.make_op(
                op_name,
                filters,
                strides,
                affine=True,
                search_space=genotype.search_space,
                initializer=initializer,
                name=f"edge_{position}_{op_name}",
                activations=self.activations,
            )
            self.edge_ops.append(op)
        # Named after the cell: checkpoints key variables by path, which must not depend on
        # how many generators the process made before.
        self.seed_generator = keras.random.SeedGenerator(seed, name=f"{self.name}_drop_path")

    def build(self, input_shape):
        self.drop_path_rate = self.add_weight(
            name="drop_path_rate", shape=(), initializer="zeros", trainable=False
        )

    def call(self, inputs, training=None):
        s0, s1 = inputs
        if training:
            # s0 is ready long before s1; a scheduling kernel may start its preprocessing
            # only once s1 exists, so that it does not take a core from the previous cell's
            # own work (pibconv_tf.kernels.tensorflow_cpu.after).
            s0 = L.after(s0, s1)
        states = [self.preprocess0(s0, training=training), self.preprocess1(s1, training=training)]
        shared = {}  # weight-free operations of the same state: computed once
        for node in range(len(self.edges) // 2):
            total = None
            for position in (2 * node, 2 * node + 1):
                op = self.edge_ops[position]
                key = self.edges[position] if isinstance(op, _WEIGHT_FREE) else position
                if key not in shared:
                    shared[key] = op(states[self.edges[position][1]], training=training)
                h = shared[key]
                if training and not isinstance(op, operations.Identity):
                    # At rate 0 the mask is all ones: the identity, without a branch.
                    h = drop_path(h, self.drop_path_rate, self.seed_generator)
                total = h if total is None else total + h
            states.append(total)
        return ops.concatenate([states[i] for i in self.concat], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "genotype": self.genotype.to_dict(),
            "filters": self.filters,
            "reduction": self.reduction,
            "reduction_prev": self.reduction_prev,
            "initializer": self.initializer,
            "seed": self.seed,
            "activated_inputs": self.activated_inputs,
            "activations": dict(self.activations),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "activations" not in config:
            # Saved before cells recorded their activations: rebuild what the space meant then.
            space = Genotype.from_dict(config["genotype"]).search_space
            legacy = search_spaces.LEGACY_SPACE_MEANING.get(space, space)
            config["activations"] = search_spaces.get_search_space(legacy).activation_map()
        return cls(**config)


def set_drop_path_rate(model, rate):
    """Sets the drop path rate of every `Cell` of `model` (DARTS ramps it per epoch)."""
    cells = [layer for layer in model.layers if isinstance(layer, Cell)]
    for cell in cells:
        cell.drop_path_rate.assign(rate)
    return len(cells)
