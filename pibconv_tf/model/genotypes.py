"""Genotypes: the discrete DARTS cell as validated data, with JSON in and out.

A genotype lists, for a normal and a reduction cell, two (operation, input) edges per
intermediate node; input 0 and 1 are the cell's inputs (C_{k-2} and C_{k-1} in the DARTS
paper) and input j >= 2 is intermediate node j - 2. Never `eval` a genotype string: read
JSON with `Genotype.from_json`.
"""

import dataclasses
import json
import numbers
import pathlib

import numpy as np

from pibconv_tf.errors import UserInputError
from pibconv_tf.model import search_spaces

EDGES_PER_NODE = 2


@dataclasses.dataclass(frozen=True)
class Genotype:
    """A DARTS cell pair.

    Attributes:
        normal: ((op_name, input_index), ...), two per node, nodes in order.
        normal_concat: indices of the states concatenated as the normal cell's output.
        reduce: the same for the reduction cell.
        reduce_concat: the same for the reduction cell.
        search_space: the space whose operation variants (activation, norm) the ops use.
    """

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]
    search_space: str = "pibconv"

    def __post_init__(self):
        # Accept lists (from JSON) and store tuples, so genotypes hash and compare.
        for field in ("normal", "reduce"):
            edges = []
            for position, edge in enumerate(getattr(self, field)):
                if isinstance(edge, (str, bytes)) or len(edge) != 2:
                    raise UserInputError(
                        f"Genotype {field} edge {position} is {edge!r}; expected a pair "
                        "[operation, input index]."
                    )
                op, index = edge
                edges.append((str(op), _whole(index, f"Genotype {field} edge {position} input")))
            object.__setattr__(self, field, tuple(edges))
        for field in ("normal_concat", "reduce_concat"):
            concat = tuple(_whole(i, f"Genotype {field} entry") for i in getattr(self, field))
            object.__setattr__(self, field, concat)
        self.validate()

    @property
    def steps(self):
        """Number of intermediate nodes per cell."""
        return len(self.normal) // EDGES_PER_NODE

    def validate(self):
        """Raises UserInputError naming the first bad field, operation or index."""
        if not search_spaces.is_search_space(self.search_space):
            raise UserInputError(
                f"Genotype search_space {self.search_space!r} is unknown; expected one of "
                f"{', '.join(search_spaces.SEARCH_SPACES)} (or pibconv_f<F>)."
            )
        primitives = search_spaces.get_search_space(self.search_space).primitives
        for cell in ("normal", "reduce"):
            edges = getattr(self, cell)
            if not edges or len(edges) % EDGES_PER_NODE:
                raise UserInputError(
                    f"Genotype {cell} cell has {len(edges)} edges; expected "
                    f"{EDGES_PER_NODE} per node (e.g. 8 for 4 nodes)."
                )
            if len(edges) != len(self.normal):
                raise UserInputError(
                    f"Genotype {cell} cell has {len(edges)} edges but the normal cell has "
                    f"{len(self.normal)}; both cells need the same number of nodes."
                )
            for position, (op, index) in enumerate(edges):
                node = position // EDGES_PER_NODE
                if op not in primitives:
                    raise UserInputError(
                        f"Genotype {cell} edge {position} uses operation {op!r}, which is not "
                        f"in search space {self.search_space!r} ({', '.join(primitives)})."
                    )
                if op == "none":
                    raise UserInputError(
                        f"Genotype {cell} edge {position} uses 'none', which a derived cell "
                        "never contains."
                    )
                if not 0 <= index < node + 2:
                    raise UserInputError(
                        f"Genotype {cell} edge {position} (node {node}) reads input {index}; "
                        f"expected 0..{node + 1} (the two cell inputs and earlier nodes)."
                    )
            concat = getattr(self, f"{cell}_concat")
            states = self.steps + 2
            if not concat or any(not 0 <= i < states for i in concat):
                raise UserInputError(
                    f"Genotype {cell}_concat {list(concat)} must list states in 0..{states - 1}."
                )

    def to_dict(self):
        return {
            "normal": [list(edge) for edge in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(edge) for edge in self.reduce],
            "reduce_concat": list(self.reduce_concat),
            "search_space": self.search_space,
        }

    def to_json(self, indent=None):
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data):
        expected = {"normal", "normal_concat", "reduce", "reduce_concat"}
        if not isinstance(data, dict) or not expected <= set(data):
            missing = sorted(expected - set(data)) if isinstance(data, dict) else sorted(expected)
            raise UserInputError(f"Genotype JSON lacks the keys {missing}.")
        try:
            return cls(
                normal=data["normal"],
                normal_concat=data["normal_concat"],
                reduce=data["reduce"],
                reduce_concat=data["reduce_concat"],
                search_space=data.get("search_space", "pibconv"),
            )
        except (TypeError, ValueError) as error:
            if isinstance(error, UserInputError):
                raise
            raise UserInputError(f"Genotype JSON is malformed: {error}.") from error

    @classmethod
    def from_json(cls, text):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserInputError(f"Genotype JSON does not parse: {error}.") from error
        return cls.from_dict(data)


def _whole(value, what):
    """`value` as an int if it is a whole number (1 or 1.0), else UserInputError."""
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and value.is_integer()
    )
    if isinstance(value, bool) or not integral:
        raise UserInputError(f"{what} is {value!r}; expected a whole number (a state index).")
    return int(value)


DARTS_V2 = Genotype(
    normal=(
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("skip_connect", 0),
        ("dil_conv_3x3", 2),
    ),
    normal_concat=(2, 3, 4, 5),
    reduce=(
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
    ),
    reduce_concat=(2, 3, 4, 5),
    search_space="darts",
)

PIBCONV = Genotype(
    normal=(
        ("pib_conv_3x3", 0),
        ("pib_conv_5x5", 1),
        ("pib_conv_3x3", 0),
        ("pib_conv_3x3", 2),
        ("pib_conv_3x3", 2),
        ("pib_conv_3x3", 1),
        ("pib_conv_3x3", 1),
        ("pib_conv_3x3", 3),
    ),
    normal_concat=(2, 3, 4, 5),
    reduce=(
        ("avg_pool_3x3", 0),
        ("pib_conv_5x5", 1),
        ("avg_pool_3x3", 0),
        ("dil_conv_5x5", 2),
        ("avg_pool_3x3", 0),
        ("skip_connect", 2),
        ("pib_conv_3x3", 3),
        ("pib_conv_3x3", 0),
    ),
    reduce_concat=(2, 3, 4, 5),
    search_space="pibconv",
)

NAMED_GENOTYPES = {"DARTS_V2": DARTS_V2, "PIBCONV": PIBCONV}


def load_genotype(spec):
    """A named genotype (`PIBCONV`, `DARTS_V2`) or the path of a genotype JSON file."""
    if spec in NAMED_GENOTYPES:
        return NAMED_GENOTYPES[spec]
    path = pathlib.Path(spec)
    if not path.is_file():
        raise UserInputError(
            f"Genotype {spec!r} is neither a named genotype ({', '.join(NAMED_GENOTYPES)}) "
            "nor an existing genotype.json file."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"Genotype file {spec!r} is not text (a genotype.json holds UTF-8 JSON)."
        ) from error
    try:
        return Genotype.from_json(text)
    except UserInputError as error:
        raise UserInputError(f"In {spec!r}: {error}") from error


def derive_cell(weights, primitives, steps=4):
    """DARTS' discretisation of one cell's softmaxed architecture weights.

    For node i, its incoming edges (2 + i of them) are ranked by their strongest
    non-`none` operation weight; the two strongest are kept (strongest first, ties to the
    lower input), each with that operation.

    Args:
        weights: array [num_edges, num_ops], rows ordered node by node.
        primitives: operation names of the columns.
        steps: number of intermediate nodes.

    Returns:
        A tuple of (op_name, input_index), two per node.
    """
    weights = np.asarray(weights, dtype=np.float64)
    none = primitives.index("none") if "none" in primitives else None
    masked = weights.copy()
    if none is not None:
        masked[:, none] = -np.inf
    edges, start = [], 0
    for node in range(steps):
        inputs = node + 2
        block = masked[start : start + inputs]
        # Stable sort on the negated strength keeps the lower input on ties, as DARTS does.
        strongest = np.argsort(-block.max(axis=1), kind="stable")[:EDGES_PER_NODE]
        for j in strongest:  # strongest first, as DARTS lists them
            edges.append((primitives[int(np.argmax(block[j]))], int(j)))
        start += inputs
    return tuple(edges)


SKIP = "skip_connect"


def derive_cell_with_skip_limit(weights, primitives, steps=4, max_skip=None):
    """`derive_cell` keeping at most `max_skip` skip connections (P-DARTS' rule).

    While the derived cell has more than `max_skip` skip connections, the one with the
    lowest skip weight loses its skip (that weight is set to zero) and the cell is derived
    again, so that edge takes its next best operation, or another input takes its place.
    None keeps DARTS' derivation.

    Reference: Chen et al., Progressive Differentiable Architecture Search, arXiv 1904.12760
    (Sec. 3.3, "search space regularization").
    """
    weights = np.array(weights, dtype=np.float64)
    edges = derive_cell(weights, primitives, steps)
    if max_skip is None or SKIP not in primitives:
        return edges
    skip = primitives.index(SKIP)
    starts = np.cumsum([0] + [node + 2 for node in range(steps)])
    while sum(op == SKIP for op, _ in edges) > max_skip:
        chosen = [
            starts[position // EDGES_PER_NODE] + j
            for position, (op, j) in enumerate(edges)
            if op == SKIP
        ]
        weakest = min(chosen, key=lambda row: weights[row, skip])
        weights[weakest, skip] = 0.0
        edges = derive_cell(weights, primitives, steps)
    return edges


def skip_count(edges):
    """How many of a cell's derived edges are skip connections."""
    return sum(op == SKIP for op, _ in edges)
