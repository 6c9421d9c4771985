"""The layout's rules: the model runs on any Keras backend, and nothing depends on benchmarks.

- Every module of `pibconv_tf/model/` imports only the standard library, numpy, keras and
  other model modules (keras-hub's `import_test.py` rule, by AST, lazy imports included).
- No module of the package imports `benchmarks` (which lives outside it).
- With TensorFlow made unimportable, Keras' JAX backend imports every model module and runs
  a derived and a search network.
"""

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "pibconv_tf" / "model"
MODEL_MODULES = sorted(MODEL_DIR.glob("*.py"))
ALLOWED_ROOTS = {"keras", "numpy", "pibconv_tf"}
ALLOWED_PACKAGE = ("pibconv_tf.model", "pibconv_tf.errors")


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports stay inside the folder
                continue
            base = node.module or ""
            yield from (f"{base}.{alias.name}" for alias in node.names)


def test_the_model_folder_is_not_empty():
    names = {path.name for path in MODEL_MODULES}
    assert {"operations.py", "networks.py", "search_network.py", "pib_conv.py"} <= names


@pytest.mark.parametrize("path", MODEL_MODULES, ids=lambda path: path.name)
def test_model_modules_import_keras_numpy_and_the_model_only(path):
    bad = []
    for name in _imports(path):
        root = name.split(".")[0]
        if root in sys.stdlib_module_names:
            continue
        if root not in ALLOWED_ROOTS or (
            root == "pibconv_tf" and not name.startswith(ALLOWED_PACKAGE)
        ):
            bad.append(name)
    assert not bad, f"{path.name} imports {bad}"


def test_no_package_module_imports_the_benchmarks():
    modules = sorted((ROOT / "pibconv_tf").rglob("*.py")) + sorted((ROOT / "apps").glob("*.py"))
    assert len(modules) > 20
    offenders = {
        str(path.relative_to(ROOT)): name
        for path in modules
        if path.name != "benchmark.py"  # the app that drives them, from a checkout
        for name in _imports(path)
        if name.split(".")[0] == "benchmarks"
    }
    assert not offenders


_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib, os, pathlib, sys
    sys.modules["tensorflow"] = None  # any `import tensorflow` now fails
    os.environ["KERAS_BACKEND"] = "jax"
    import numpy as np
    for path in sorted(pathlib.Path("pibconv_tf/model").glob("*.py")):
        importlib.import_module(f"pibconv_tf.model.{path.stem}")
    from pibconv_tf.model import genotypes, networks, search_network
    model = networks.network_cifar(genotypes.PIBCONV, 10, 4, 2, image_size=16)
    logits = model(np.zeros((1, 16, 16, 3), "float32"), training=False)
    net = search_network.SearchNetwork(10, 4, 3, steps=2, multiplier=2)
    search_network.build_network(net, 8)
    assert "tensorflow" not in [m for m in sys.modules if sys.modules[m] is not None]
    print(tuple(logits.shape), net.genotype().search_space)
    """
)


def test_the_model_runs_without_tensorflow():
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["(1,", "10)", "pibconv"]
