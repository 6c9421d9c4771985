"""The quick start end to end: `apps.demo` at its smallest settings, every artifact checked."""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from pibconv_tf import data
from pibconv_tf.model import networks  # noqa: F401 (registers the layers for loading)
from pibconv_tf.model.genotypes import Genotype

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    command = [
        sys.executable,
        "-m",
        "apps.demo",
        f"--output_dir={out}",
        "--search_epochs=1",
        "--search_layers=3",
        "--search_channels=4",
        "--train_epochs=1",
        "--train_layers=2",
        "--train_channels=4",
        "--batch_size=8",
        "--steps_per_epoch=2",
        "--benchmark_runs=5",
        "--intra_op_threads=1",
        "--inter_op_threads=2",
        "--cpu_kernels=off",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "=== Summary" in result.stdout
    # Every stage ran in this one process, with the runtime flags given to the demo.
    stages = [line for line in result.stdout.splitlines() if line.startswith("=== [")]
    for stage in ("search", "train", "evaluate", "export", "gradcam", "plot"):
        assert any(line.startswith(f"=== [{stage}] python -m apps.") for line in stages), stage
    runtime = json.loads((out / "summary.json").read_text())["runtime"]
    assert (runtime["intra_op_threads"], runtime["inter_op_threads"]) == (1, 2)
    assert runtime["cpu_kernels"] is False  # --cpu_kernels=off reached the stages
    return out


@pytest.mark.slow
def test_demo_writes_every_artifact(demo_dir):
    genotype = Genotype.from_json((demo_dir / "search" / "genotype.json").read_text())
    assert genotype.search_space == "pibconv"
    assert all(op != "none" for op, _ in genotype.normal + genotype.reduce)
    search_metrics = [json.loads(line) for line in (demo_dir / "search" / "metrics.jsonl").open()]
    train_metrics = [json.loads(line) for line in (demo_dir / "train" / "metrics.jsonl").open()]
    assert len(search_metrics) == 1 and len(train_metrics) == 1
    assert np.load(demo_dir / "search" / "alphas.npz")["normal"].shape[0] == 1

    evaluation = json.loads((demo_dir / "evaluate.json").read_text())
    assert evaluation["num_images"] == 360
    assert evaluation["params"] > 0 and evaluation["gmacs"] > 0
    # The reported top-1 is the trained model's on the test split, as computed here.
    model = keras.saving.load_model(demo_dir / "train" / "model.keras")
    info = data.DatasetInfo.from_json_dict(
        json.loads((demo_dir / "train" / "dataset.json").read_text())
    )
    images, labels = data.load_source("digits", seed=0).numpy("test")
    logits = np.asarray(model.predict(data.normalize(images, info), verbose=0))
    assert abs(evaluation["top1"] - float(np.mean(logits.argmax(-1) == labels))) < 1e-9

    parity = json.loads((demo_dir / "export" / "parity.json").read_text())["artifacts"]
    assert parity["tflite_fp32"]["max_abs_logit_diff"] <= 1e-4
    assert parity["tflite_fp32"]["top1_agreement"] == 1.0
    for name in ("tflite_int8", "tflite_int8_mixed"):
        # Quantized yet not saturated: most predictions agree with float32's.
        assert parity[name]["top1_agreement"] >= 0.5, (name, parity[name])

    summary = json.loads((demo_dir / "summary.json").read_text())
    stems = ("model_fp32", "model_int8", "model_int8_mixed")
    assert set(summary["tflite_bytes"]) == {f"{stem}.tflite" for stem in stems}
    for stem in stems:
        assert summary["edge_latency"][stem]["median_ms"] > 0


@pytest.mark.slow
def test_edge_runner_agrees_with_keras_on_the_png_files(demo_dir):
    model = keras.saving.load_model(demo_dir / "train" / "model.keras")
    info = data.DatasetInfo.from_json_dict(
        json.loads((demo_dir / "train" / "dataset.json").read_text())
    )
    results = json.loads((demo_dir / "edge" / "model_fp32.json").read_text())
    assert len(results) == 4
    for result in results:
        image = np.asarray(Image.open(result["image"]).convert("RGB"))[None]
        logits = np.asarray(model(data.normalize(image, info), training=False))[0]
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        best = result["top_k"][0]
        assert best["index"] == int(np.argmax(probabilities))
        assert abs(best["probability"] - float(probabilities.max())) < 1e-4


@pytest.mark.slow
def test_pictures_decode_and_are_not_blank(demo_dir):
    figures = demo_dir / "figures"
    for name in ("gradcam.png", "alphas_normal.png", "search_curves.png", "cells_search.png"):
        with Image.open(figures / name) as picture:
            pixels = np.asarray(picture.convert("L"), np.float32)
        assert min(pixels.shape) > 100, name
        assert pixels.std() > 5 and pixels.min() < 200, f"{name} looks blank"


def test_the_demo_runs_its_stages_in_process():
    """So that it works from an installed package: no `python -m` subprocesses."""
    import ast  # noqa: PLC0415

    tree = ast.parse((REPO / "pibconv_tf" / "demo.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "subprocess" not in imported
