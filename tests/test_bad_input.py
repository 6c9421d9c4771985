"""Every row of docs/bad_input.md: the app fails with its message and touches nothing."""

import hashlib
import os
import pathlib
import re
import shlex

import pytest

from pibconv_tf.train import config as train_config
from pibconv_tf.train import run as training
from tests import app_process

REPO = pathlib.Path(__file__).resolve().parents[1]
TABLE = REPO / "docs" / "bad_input.md"


def _rows():
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].startswith("apps."):
            continue
        app, arguments, environment, message, status, untouched = cells
        rows.append(
            pytest.param(
                app,
                arguments.strip("`"),
                environment.strip("`"),
                message.strip("`"),
                int(status),
                untouched.strip("`"),
                id=f"{app}-{len(rows)}",
            )
        )
    return rows


def _tree(path):
    path = pathlib.Path(path)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    training.train(
        train_config.TrainConfig(
            genotype="PIBCONV",
            dataset="digits",
            image_size=8,
            init_channels=4,
            layers=1,
            epochs=1,
            batch_size=8,
            cutout_length=4,
            steps_per_epoch=2,
            model_dir=str(run),
            verbose=0,
        )
    )
    binary = root / "binary.json"
    binary.write_bytes(bytes(range(256)))
    fractional = root / "fractional.json"
    fractional.write_text(
        '{"normal": [["skip_connect", 0], ["skip_connect", 1.7]], "normal_concat": [2],'
        ' "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]], "reduce_concat": [2]}'
    )
    notzip = root / "fake" / "model.keras"
    notzip.parent.mkdir()
    notzip.write_text("not a model")
    return {"run": run, "binary": binary, "fractional": fractional, "notzip": notzip, "root": root}


def test_the_table_has_its_rows():
    assert len(_rows()) >= 15


@pytest.mark.parametrize("app, arguments, environment, message, status, untouched", _rows())
def test_bad_input(places, tmp_path, app, arguments, environment, message, status, untouched):
    values = {name: str(path) for name, path in places.items()}
    values["out"] = str(tmp_path / "out")
    args = shlex.split(arguments.format(**values))
    target = untouched.format(**values)
    before = _tree(target)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if environment:
        name, value = environment.split("=", 1)
        env[name] = value
    result = app_process.run_app(app, *args, env=env, timeout=300)
    assert result.returncode == status, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if "flag" not in message.lower():
        assert re.search(r"^error: ", result.stderr, re.M), result.stderr[-2000:]
    assert _tree(target) == before, f"{target} changed"
