"""Genotypes: named constants, JSON round trip, validation errors, DARTS discretisation."""

import json

import numpy as np
import pytest

from pibconv_tf.errors import UserInputError
from pibconv_tf.model import genotypes as G
from pibconv_tf.model import search_spaces


def test_named_genotypes_are_the_papers():
    assert G.PIBCONV.normal[1] == ("pib_conv_5x5", 1)
    assert G.PIBCONV.reduce[3] == ("dil_conv_5x5", 2)
    assert G.DARTS_V2.normal[-1] == ("dil_conv_3x3", 2)
    assert G.DARTS_V2.reduce_concat == (2, 3, 4, 5)
    assert G.DARTS_V2.search_space == "darts"


@pytest.mark.parametrize("name", sorted(G.NAMED_GENOTYPES))
def test_json_round_trip(name, tmp_path):
    genotype = G.NAMED_GENOTYPES[name]
    assert G.Genotype.from_json(genotype.to_json()) == genotype
    path = tmp_path / "genotype.json"
    path.write_text(genotype.to_json(indent=2))
    assert G.load_genotype(str(path)) == genotype
    assert G.load_genotype(name) is genotype


def _edit(cell="normal", position=0, edge=None, **fields):
    data = G.PIBCONV.to_dict()
    if edge is not None:
        data[cell][position] = list(edge)
    data.update(fields)
    return json.dumps(data)


@pytest.mark.parametrize(
    "text, message",
    [
        (_edit(edge=("sep_conv_9x9", 0)), "operation 'sep_conv_9x9'"),
        (_edit(edge=("none", 0)), "uses 'none'"),
        (_edit(position=2, edge=("pib_conv_3x3", 3)), r"node 1\) reads input 3; expected 0..2"),
        (_edit(normal=[["pib_conv_3x3", 0]] * 7), "has 7 edges"),
        (_edit(reduce_concat=[2, 9]), "reduce_concat"),
        (_edit(search_space="vit"), "search_space 'vit'"),
        ('{"normal": []}', "lacks the keys"),
        ("{not json", "does not parse"),
        (_edit(edge=("pib_conv_3x3", "x")), "input is 'x'; expected a whole number"),
    ],
)
def test_validation_errors_name_the_problem(text, message):
    with pytest.raises(UserInputError, match=message):
        G.Genotype.from_json(text)


def test_load_genotype_unknown(tmp_path):
    with pytest.raises(UserInputError, match="neither a named genotype"):
        G.load_genotype(str(tmp_path / "missing.json"))


def test_derive_cell_on_hand_set_weights():
    primitives = search_spaces.get_search_space("pibconv").primitives
    weights = np.full((14, len(primitives)), 0.01)
    weights[:, 0] = 0.9  # `none` dominates everywhere: it must still never be chosen
    picks = {  # edge index -> (op, strength)
        0: ("pib_conv_3x3", 0.5),
        1: ("skip_connect", 0.6),  # node 0: inputs 0, 1
        3: ("avg_pool_3x3", 0.4),
        4: ("dil_conv_5x5", 0.7),  # node 1: inputs 1, 2
        5: ("pib_conv_7x7", 0.3),
        8: ("conv_7x1_1x7", 0.35),  # node 2: inputs 0, 3
        13: ("max_pool_3x3", 0.2),
        11: ("pib_conv_5x5", 0.25),  # node 3: inputs 4, 2
    }
    for edge, (op, strength) in picks.items():
        weights[edge, primitives.index(op)] = strength
    cell = G.derive_cell(weights, primitives, steps=4)
    assert cell == (
        ("skip_connect", 1),
        ("pib_conv_3x3", 0),
        ("dil_conv_5x5", 2),
        ("avg_pool_3x3", 1),
        ("conv_7x1_1x7", 3),
        ("pib_conv_7x7", 0),
        ("pib_conv_5x5", 2),
        ("max_pool_3x3", 4),
    )
    assert all(op != "none" for op, _ in cell)


def test_max_skip_keeps_the_strongest_skips_and_rederives_the_rest():
    """P-DARTS' rule: with more skip connections than allowed, the weakest skips give way
    to their edge's next best operation (or to another input), the strongest stay."""
    primitives = search_spaces.get_search_space("darts").primitives
    weights = np.full((14, len(primitives)), 0.01)
    skip, sep3 = primitives.index("skip_connect"), primitives.index("sep_conv_3x3")
    # Skips on edges 0 (0.9), 1 (0.5), 3 (0.8), 4 (0.3); next best operations below them.
    for edge, strength in {0: 0.9, 1: 0.5, 3: 0.8, 4: 0.3}.items():
        weights[edge, skip] = strength
    weights[1, sep3], weights[4, sep3], weights[2, sep3] = 0.2, 0.1, 0.25
    plain = G.derive_cell(weights, primitives, steps=4)
    assert G.skip_count(plain[:4]) == 4
    limited = G.derive_cell_with_skip_limit(weights, primitives, steps=4, max_skip=2)
    assert G.skip_count(limited) == 2
    assert limited[:2] == (("skip_connect", 0), ("sep_conv_3x3", 1))  # node 0: edge 1 gave way
    # Node 1 (edges 2, 3, 4 = inputs 0, 1, 2): skip on input 1 stays; input 0's sep_conv
    # (0.25) now outranks input 2's (0.1).
    assert limited[2:4] == (("skip_connect", 1), ("sep_conv_3x3", 0))
    assert limited[4:] == plain[4:]
    assert G.derive_cell_with_skip_limit(weights, primitives, 4, None) == plain
    assert G.skip_count(G.derive_cell_with_skip_limit(weights, primitives, 4, 0)) == 0
