"""The layout's rules: the model runs on any Keras backend, and nothing depends on benchmarks.

- Every module of `pibconv_tf/model/` imports only the standard library, numpy, keras and
  other model modules (keras-hub's `import_test.py` rule, by AST, lazy imports included).
- No module of the package imports `benchmarks` (which lives outside it).
- With TensorFlow made unimportable, Keras' numpy backend imports every model module and
  runs a derived and a search network.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "pibconv_tf" / "model"
MODEL_MODULES = sorted(MODEL_DIR.glob("*.py"))
ALLOWED_ROOTS = {"keras", "numpy", "pibconv_tf"}
ALLOWED_PACKAGE = ("pibconv_tf.model", "pibconv_tf.errors", "pibconv_tf.kernels")


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
