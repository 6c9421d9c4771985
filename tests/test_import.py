"""Model code stays backend-agnostic: it imports keras, never tensorflow (keras-hub's rule)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_MODULES = [
    "pibconv_tf/layers.py",
    "pibconv_tf/ops.py",
    "pibconv_tf/pib_conv.py",
    "pibconv_tf/genotypes.py",
    "pibconv_tf/cells.py",
    "pibconv_tf/networks.py",
    "pibconv_tf/optim.py",
    "pibconv_tf/complexity.py",
    "pibconv_tf/search/mixed_op.py",
    "pibconv_tf/search/network.py",
]


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("module", MODEL_MODULES)
def test_model_modules_do_not_import_tensorflow(module):
    path = ROOT / module
    if not path.exists():
        pytest.skip(f"{module} is not in the tree")
    bad = [name for name in _imports(path) if name.split(".")[0] == "tensorflow"]
    assert not bad, f"{module} imports {bad}"
