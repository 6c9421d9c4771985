"""Complexity counts: the paper's Table 1 GMACs within 4%, exact small cases, the app."""

import json

import pytest

from pibconv_tf.model import complexity, networks, operations
from pibconv_tf.model import genotypes as G
from tests import app_process

TABLE_1_GMACS = {
    "DARTS_V2": {
        20: 0.547,
        15: 0.408,
        10: 0.265,
        8: 0.207,
        7: 0.180,
        6: 0.153,
        5: 0.121,
        4: 0.090,
        3: 0.067,
        2: 0.035,
    },
    "PIBCONV": {
        20: 0.969,
        15: 0.724,
        10: 0.470,
        8: 0.369,
        7: 0.320,
        6: 0.275,
        5: 0.218,
        4: 0.166,
        3: 0.123,
        2: 0.067,
    },
}


TABLE_1_PARAMS = {
    "DARTS_V2": {
        20: 3349342,
        15: 2281258,
        10: 1596034,
        8: 1154926,
        7: 1047430,
        6: 635446,
        5: 605026,
        4: 487162,
        3: 116650,
        2: 82342,
    },
    "PIBCONV": {
        20: 6006790,
        15: 4173526,
        10: 2993014,
        8: 2236870,
        7: 2050534,
        6: 1346086,
        5: 1293094,
        4: 1096390,
        3: 433414,
        2: 376534,
    },
}
_DEEP = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(TABLE_1_GMACS))
@pytest.mark.parametrize(
    "layers", [2, 3, 4, 5, 6, 7, 8] + [pytest.param(n, marks=_DEEP) for n in (10, 15, 20)]
)
def test_table_1_params_exact_and_gmacs_within_4_percent(name, layers):
    # With the auxiliary head built: the counts must leave it out, as the paper does.
    model = networks.network_cifar(G.NAMED_GENOTYPES[name], 10, 36, layers, auxiliary=True)
    result = complexity.model_complexity(model)
    assert result["params"] == TABLE_1_PARAMS[name][layers]
    paper = TABLE_1_GMACS[name][layers]
    assert abs(result["gmacs"] / paper - 1) < 0.04, (result, paper)
    assert result["conv_dense_gmacs"] < result["gmacs"]


def test_pib_conv_macs_by_hand():
    count = complexity._Count()
    op = operations.make_op("pib_conv_3x3", 8, 1, affine=True)
    shape = complexity.op_count(count, op, (4, 4, 8))
    hw = 16
    conv = hw * 8 * 9 + hw * 16 * 8 + hw * 8 * 9 * 2 + hw * 8 * 8
    assert shape == (4, 4, 8)
    assert count.conv_dense == conv
    assert count.elementwise == hw * 8 * 2 + hw * 8  # affine BN, GELU


def test_app_json_output_and_bad_input():
    command = ["--genotype=PIBCONV", "--layers=2,3", "--init_channels=36", "--format=json"]
    result = app_process.run_app("apps.complexity", *command)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["genotype"], r["layers"], r["params"]) for r in rows] == [
        ("PIBCONV", 2, 376534),
        ("PIBCONV", 3, 433414),
    ]
    assert all(isinstance(r["gmacs"], float) for r in rows)
    bad = app_process.run_app("apps.complexity", "--genotype=PIBCONV", "--layers=two")
    assert bad.returncode == 1
    assert "error: --layers must be whole numbers" in bad.stderr
    assert "Traceback" not in bad.stderr
