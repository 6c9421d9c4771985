"""Search spaces: named operation sets, and how each builds its operations, as data.

The PIBConv paper's roadmap (Fig. 1) goes from DARTS' space through GELU, LayerNorm and the
ConvNeXt block to PIBConv; each stage is a `SearchSpace` here. `get_search_space(name)`
returns one; "<space>_f<F>" derives a PIBConv space with the bottleneck ratio F.

Reference:
    DARTS: Liu et al., arXiv 1806.09055. PIBConv: Ahmadian et al., arXiv 2301.01286.
"""

import dataclasses
import re

# The operation kinds whose activation a search space chooses (PIBConv and the ConvNeXt
# block have GELU inside them in every space).
CONV_KINDS = ("sep_conv", "dil_conv", "conv_7x1_1x7")


def conv_kind(op_name):
    """The kind of `op_name` among `CONV_KINDS` ("dil_conv_5x5" -> "dil_conv"), or None."""
    for kind in CONV_KINDS:
        if op_name == kind or op_name.startswith(f"{kind}_"):
            return kind
    return None


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A named operation set and, as data, how its operations are built.

    Attributes:
        name: registry key, e.g. "pibconv".
        primitives: operation names, in the order of the architecture weights' columns.
        activations: ((kind, "relu" | "gelu"), ...) for each kind of `CONV_KINDS` that the
            space holds: the activation its separable, dilated and 7x1/1x7 convolutions use.
        norm: "bn" or "ln" for the same convolutions.
        pool_batch_norm: whether a search edge (`MixedOp`) follows its pooling operations by
            a BatchNorm without scale and centre, as DARTS' `MixedOp` does; the PIBConv
            code's `MixedOp` applies the pools alone.
        pib_expansion: F, the pseudo-inverted bottleneck ratio of the `pib_conv` operations
            (2 in the paper; `get_search_space("pibconv_f3")` is `pibconv` with F = 3).
        description: the roadmap stage (the PIBConv paper's Fig. 1) and its source.
    """

    name: str
    primitives: tuple[str, ...]
    activations: tuple[tuple[str, str], ...] = ()
    norm: str = "bn"
    pool_batch_norm: bool = True
    pib_expansion: int = 2
    description: str = ""

    def activation_of(self, op_name):
        """The activation of operation `op_name` in this space (None for other kinds)."""
        return dict(self.activations).get(conv_kind(op_name))

    def activation_map(self):
        """{kind: activation} of the space, what a derived cell records in its config."""
        return dict(self.activations)


_DARTS_OPS = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


def _pib_family(prefix):
    return (
        "none",
        "skip_connect",
        f"{prefix}_3x3",
        f"{prefix}_5x5",
        f"{prefix}_7x7",
        "dil_conv_3x3",
        "dil_conv_5x5",
        "conv_7x1_1x7",
        "max_pool_3x3",
        "avg_pool_3x3",
    )


def _darts_activations(activation):
    return (("sep_conv", activation), ("dil_conv", activation))


def _pib_activations(activation):
    return (("dil_conv", activation), ("conv_7x1_1x7", activation))


SEARCH_SPACES = {
    space.name: space
    for space in (
        SearchSpace(
            "darts",
            _DARTS_OPS,
            _darts_activations("relu"),
            description="DARTS (V2) operation set",
        ),
        SearchSpace(
            "darts_gelu",
            _DARTS_OPS,
            _darts_activations("gelu"),
            description="DARTS with ReLU -> GELU",
        ),
        SearchSpace(
            "darts_gelu_ln",
            _DARTS_OPS,
            _darts_activations("gelu"),
            norm="ln",
            description="GELU and BatchNorm -> LayerNorm",
        ),
        SearchSpace(
            "convnext",
            _pib_family("convnext_conv"),
            _pib_activations("gelu"),
            description="ConvNeXt inverted bottleneck (GELU throughout, as the paper's text)",
        ),
        SearchSpace(
            "pibconv",
            _pib_family("pib_conv"),
            _pib_activations("relu"),
            pool_batch_norm=False,
            description=(
                "the paper's final set, as the authors' released code builds it (ReLU in the "
                "dilated and 7x1-1x7 convolutions, GELU inside PIBConv, no BatchNorm after "
                "the pools of a search edge)"
            ),
        ),
        SearchSpace(
            "pibconv_gelu",
            _pib_family("pib_conv"),
            _pib_activations("gelu"),
            description=(
                "the paper's final set read literally (GELU in every convolution, DARTS' "
                "BatchNorm after search pools): what `pibconv` built before pibconv_tf 0.2"
            ),
        ),
    )
}

# What a space name meant in models saved before derived cells recorded their activations
# (pibconv_tf 0.1): such a model is rebuilt with the activations of the space named here.
LEGACY_SPACE_MEANING = {"pibconv": "pibconv_gelu"}


# "<space>_f<F>": a space with pib_conv operations, its bottleneck ratio F set (the paper
# tried F from 1.5 to 4.5 and kept 2). F is a whole number: the grouped convolution takes
# F expanded channels per output channel (groups = C).
_EXPANSION_NAME = re.compile(r"^(?P<base>[a-z_]+?)_f(?P<expansion>[0-9]+)$")
MAX_PIB_EXPANSION = 8


def get_search_space(name):
    """The `SearchSpace` called `name`, or a ValueError listing the known ones.

    Besides the registered names, "<space>_f<F>" names a space holding `pib_conv`
    operations with the bottleneck ratio F in 1..8 (e.g. "pibconv_f3").
    """
    if name in SEARCH_SPACES:
        return SEARCH_SPACES[name]
    match = _EXPANSION_NAME.match(str(name))
    base = SEARCH_SPACES.get(match["base"]) if match else None
    if base is not None and any(op.startswith("pib_conv") for op in base.primitives):
        expansion = int(match["expansion"])
        if 1 <= expansion <= MAX_PIB_EXPANSION:
            return dataclasses.replace(
                base,
                name=name,
                pib_expansion=expansion,
                description=f"{base.description}; PIBConv ratio F = {expansion}",
            )
    raise ValueError(
        f"Unknown search space {name!r}; expected one of {', '.join(SEARCH_SPACES)}, or "
        f"pibconv_f<F> / pibconv_gelu_f<F> with F in 1..{MAX_PIB_EXPANSION}."
    )


def is_search_space(name):
    """Whether `get_search_space(name)` knows `name`."""
    try:
        get_search_space(name)
    except ValueError:
        return False
    return True


def all_primitives():
    """Every operation name of every search space, sorted."""
    return sorted({op for space in SEARCH_SPACES.values() for op in space.primitives})
