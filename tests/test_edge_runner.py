"""Tests for edge/run_tflite.py, the TensorFlow-free runner for the edge device.

Tiny Keras models are converted here with `tf.lite.TFLiteConverter.from_keras_model`; the
runner runs as a subprocess, as it does on the device, and its answers are checked against
Keras on the same pixels.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pibconv_tf.deploy import device_report

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")

RUNNER = Path(__file__).resolve().parents[1] / "edge" / "run_tflite.py"
SIZE = 8
LABELS = ["red", "green", "blue"]


def run_runner(*args):
    return subprocess.run(
        [sys.executable, str(RUNNER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_json(*args):
    result = run_runner(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def probabilities_from_json(entries):
    """Full probability vectors from runner JSON entries (top_k must cover all classes)."""
    out = np.zeros((len(entries), len(LABELS)))
    for row, entry in enumerate(entries):
        for item in entry["top_k"]:
            out[row, item["index"]] = item["probability"]
            assert item["label"] == LABELS[item["index"]]
    return out


def reference_pixels(path):
    """What the runner should feed for `path`: RGB, bilinear-resized to SIZE x SIZE."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def keras_probabilities(model, pixels):
    logits = model(pixels.astype(np.float32), training=False)
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))


def random_model(batch_size=None):
    """Rescaling -> Conv2D 3x3 -> GAP -> Dense 3, with fixed weights large enough that the
    classes are well apart."""
    inputs = keras.Input((SIZE, SIZE, 3), batch_size=batch_size)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(len(LABELS), name="dense")(x)
    model = keras.Model(inputs, logits)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 2, w.shape).astype(np.float32) for w in model.weights])
    return model


def colour_model():
    """Class k scores channel k's mean brightness: solid red/green/blue are unambiguous."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 1, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(len(LABELS), name="dense")(x)
    model = keras.Model(inputs, logits)
    # Features 0..2 are the channels, feature 3 their mean; logit k = 3 f_k - f_3. Solid
    # colours get top-1 probability ~0.9, not 1.0, so a missing dequantization shows.
    conv = np.concatenate([np.eye(3), np.full((3, 1), 1 / 3)], axis=1)
    dense = np.concatenate([3 * np.eye(3), np.full((1, 3), -1.0)], axis=0)
    model.set_weights(
        [conv.reshape(1, 1, 3, 4), np.zeros(4), dense, np.zeros(len(LABELS))],
    )
    return model


def convert(model, quantized_input=None):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantized_input is not None:

        def representative_dataset():
            rng = np.random.default_rng(1)
            for i in range(32):
                # Random images of a random colour plus noise; every other colour is a corner
                # of the RGB cube, so calibration sees the activation ranges of solid colours.
                if i % 2:
                    colour = rng.uniform(0, 255, (1, 1, 1, 3))
                else:
                    colour = rng.integers(0, 2, (1, 1, 1, 3)) * 255.0
                noise = rng.normal(0, 20, (1, SIZE, SIZE, 3)) * (i % 2)
                yield [np.clip(colour + noise, 0, 255).astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = quantized_input
        converter.inference_output_type = tf.int8
    return converter.convert()


@pytest.fixture(scope="module")
def runner_module():
    spec = importlib.util.spec_from_file_location("run_tflite", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Models, labels and images written once for the whole module."""
    root = tmp_path_factory.mktemp("edge")
    keras.utils.set_random_seed(0)
    models = {"random": random_model(), "colour": colour_model()}
    (root / "random.tflite").write_bytes(convert(models["random"]))
    (root / "int8.tflite").write_bytes(convert(models["colour"], tf.int8))
    (root / "uint8.tflite").write_bytes(convert(models["colour"], tf.uint8))
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    rng = np.random.default_rng(2)
    exact = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(exact).save(root / "exact.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "grey.png")
    for k, name in enumerate(LABELS):
        solid = np.zeros((10, 10, 3), np.uint8)
        solid[..., k] = 255
        Image.fromarray(solid).save(root / f"{name}.png")
    return root, models, exact


def test_float_model_matches_keras(workdir):
    root, models, exact = workdir
    paths = [root / "exact.png", root / "wide.png", root / "grey.png"]
    entries = run_json(
        f"--model={root / 'random.tflite'}", f"--labels={root / 'labels.txt'}", "--top_k=3", *paths
    )
    assert [e["image"] for e in entries] == [str(p) for p in paths]
    got = probabilities_from_json(entries)
    pixels = np.stack([reference_pixels(p) for p in paths])
    np.testing.assert_array_equal(pixels[0], exact)  # an 8x8 image is fed unresized
    want = keras_probabilities(models["random"], pixels)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # The classes are well apart, so the top-1 comparison below is not a coin toss.
    ordered = np.sort(want, axis=1)
    assert np.all(ordered[:, -1] - ordered[:, -2] > 1e-3)
    assert [e["top_k"][0]["label"] for e in entries] == [LABELS[i] for i in want.argmax(1)]
    for entry in entries:
        probabilities = [item["probability"] for item in entry["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True)


def test_top_k_limits_entries(workdir):
    root, _, _ = workdir
    entries = run_json(f"--model={root / 'random.tflite'}", "--top_k=2", root / "exact.png")
    assert len(entries[0]["top_k"]) == 2
    # Without --labels the class index stands in for the name.
    assert all(item["label"] == str(item["index"]) for item in entries[0]["top_k"])


def test_text_output_has_one_line_per_class(workdir):
    root, _, _ = workdir
    result = run_runner(
        f"--model={root / 'int8.tflite'}",
        f"--labels={root / 'labels.txt'}",
        "--top_k=2",
        root / "green.png",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(root / "green.png")
    assert len(lines) == 3
    assert lines[1].split()[:2] == ["1.", "green"]
    assert lines[1].split()[2].endswith("%")


def test_runner_does_not_import_tensorflow(workdir):
    root, models, exact = workdir
    script = f"""
import json, sys
sys.path.insert(0, {str(RUNNER.parent)!r})
import numpy as np
import run_tflite
interpreter = run_tflite.load_interpreter({str(root / "random.tflite")!r}, 1)
images = np.array({exact.tolist()!r}, dtype=np.uint8)[None]
probabilities = run_tflite.classify(interpreter, images)
record = run_tflite.benchmark(interpreter, 1, 3)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
print(json.dumps({{"probabilities": probabilities.tolist(), "record": record,
                  "leaked": leaked}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["leaked"] == []
    want = keras_probabilities(models["random"], exact[None])
    np.testing.assert_allclose(out["probabilities"], want, atol=1e-4)
    assert out["record"]["runs"] == 3
    assert out["record"]["threads"] == 1


@pytest.mark.parametrize(
    "model_name, input_dtype", [("int8.tflite", np.int8), ("uint8.tflite", np.uint8)]
)
def test_quantized_model_agrees_with_keras(workdir, runner_module, model_name, input_dtype):
    root, models, _ = workdir
    interpreter = runner_module.load_interpreter(str(root / model_name), 1)
    assert interpreter.get_input_details()[0]["dtype"] == input_dtype
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    paths = [root / f"{name}.png" for name in LABELS]
    entries = run_json(
        f"--model={root / model_name}", f"--labels={root / 'labels.txt'}", "--top_k=3", *paths
    )
    assert [e["top_k"][0]["label"] for e in entries] == LABELS
    want = keras_probabilities(models["colour"], np.stack([reference_pixels(p) for p in paths]))
    np.testing.assert_allclose(probabilities_from_json(entries), want, atol=0.02)


def test_batched_model_pads_the_last_batch(runner_module, tmp_path):
    keras.utils.set_random_seed(0)
    model = random_model(batch_size=2)
    path = tmp_path / "batch2.tflite"
    path.write_bytes(convert(model))
    interpreter = runner_module.load_interpreter(str(path), 1)
    assert list(interpreter.get_input_details()[0]["shape"]) == [2, SIZE, SIZE, 3]
    images = np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    got = runner_module.classify(interpreter, images)
    # Three images run as two batches of two, the second zero-padded; Keras gets the same.
    want = keras_probabilities(model, images[:2])
    padded = np.concatenate([images[2:], np.zeros_like(images[:1])])
    want = np.concatenate([want, keras_probabilities(model, padded)[:1]])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_logits_output_is_chosen_by_name(runner_module, tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    logits = keras.layers.Dense(len(LABELS), name="logits")(x)
    probabilities = keras.layers.Softmax(name="probabilities")(logits)
    model = keras.Model(inputs, {"probabilities": probabilities, "logits": logits})
    model.get_layer("logits").set_weights(
        [np.array([[9, 0, -9], [0, 3, 0], [-9, 0, 9]]), np.zeros(3)]
    )
    path = tmp_path / "two_outputs.tflite"
    path.write_bytes(convert(model))
    interpreter = runner_module.load_interpreter(str(path), 1)
    assert len(interpreter.get_output_details()) == 2
    images = np.random.default_rng(4).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    want = keras.ops.convert_to_numpy(model(images.astype(np.float32))["probabilities"])
    # Softmax applied to the probabilities output instead would flatten these towards 1/3.
    np.testing.assert_allclose(runner_module.classify(interpreter, images), want, atol=1e-5)


def test_benchmark_json(workdir):
    root, _, _ = workdir
    record = run_json(
        f"--model={root / 'random.tflite'}", "--benchmark", "--runs=7", "--warmup=2", "--threads=1"
    )
    assert record["runs"] == 7
    assert record["warmup"] == 2
    assert record["threads"] == 1
    assert 0 < record["min_ms"] <= record["median_ms"] <= record["p90_ms"]
    assert record["min_ms"] <= record["mean_ms"]


def latency_table(stdout):
    """{column header: [cells]} of the runner's latency table, and its header line."""
    lines = stdout.splitlines()
    headers = [h for _, h, _, _ in device_report.LATENCY_COLUMNS]
    rows = [line.split() for line in lines[1:] if line and not line.startswith("(")]
    return {h: [row[1 + i] for row in rows] for i, h in enumerate(headers)}, lines[0]


def test_benchmark_text_with_image_and_default_threads(workdir):
    root, _, _ = workdir
    result = run_runner(
        f"--model={root / 'int8.tflite'}", "--benchmark", "--runs=5", root / "red.png"
    )
    assert result.returncode == 0, result.stderr
    table, _ = latency_table(result.stdout)
    assert table["threads"] == [str(len(os.sched_getaffinity(0)))]
    assert 0 < float(table["median ms"][0]) <= float(table["p90 ms"][0])
    assert table["runs"] == ["5"]
    assert "(5 runs after 10 warm-up at batch 1" in result.stdout


def test_benchmark_prints_a_row_per_thread_count_as_the_device_report(workdir):
    root, _, _ = workdir
    model = root / "random.tflite"
    result = run_runner(f"--model={model}", "--benchmark", "--runs=4", "--threads=1,2,4")
    assert result.returncode == 0, result.stderr
    table, header = latency_table(result.stdout)
    assert table["threads"] == ["1", "2", "4"]
    for median, low in zip(table["median ms"], table["min ms"], strict=True):
        assert 0 < float(low) <= float(median)
    # The same columns as the latency table of device_report.md, in the same layout.
    assert header == device_report.format_latency([], model.name)
    records = run_json(f"--model={model}", "--benchmark", "--runs=4", "--threads=1,2")
    assert [r["threads"] for r in records] == [1, 2]
    assert all(r["runs"] == 4 and r["cpu_ms"] >= 0 for r in records)


def test_classifying_takes_one_thread_count(workdir):
    root, _, _ = workdir
    result = run_runner(f"--model={root / 'int8.tflite'}", "--threads=1,2", root / "red.png")
    assert result.returncode == 1 and "--threads takes one value to classify" in result.stderr


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda r: ["--model=" + str(r / "absent.tflite"), r / "red.png"], "does not exist"),
        (lambda r: ["--model=" + str(r / "labels.txt"), r / "red.png"], "is not a TFLite model"),
        (lambda r: ["--model=" + str(r / "int8.tflite"), r / "absent.png"], "does not exist"),
        (
            lambda r: ["--model=" + str(r / "int8.tflite"), r / "labels.txt"],
            "could not be read as an image",
        ),
        (
            lambda r: [
                "--model=" + str(r / "int8.tflite"),
                "--labels=" + str(r / "two.txt"),
                r / "red.png",
            ],
            "has 2 labels but the model has 3 classes",
        ),
        (
            lambda r: [
                "--model=" + str(r / "int8.tflite"),
                "--labels=" + str(r / "nope.txt"),
                r / "red.png",
            ],
            "does not exist",
        ),
        (lambda r: ["--model=" + str(r / "int8.tflite"), "--top_k=0", r / "red.png"], "--top_k"),
        (lambda r: ["--model=" + str(r / "int8.tflite"), "--threads=0", r / "red.png"], "threads"),
        (lambda r: ["--model=" + str(r / "int8.tflite"), r], "is a directory; pass the image"),
        (lambda r: ["--model=" + str(r), r / "red.png"], "is a directory; pass the .tflite"),
    ],
    ids=[
        "no-model",
        "not-tflite",
        "no-image",
        "bad-image",
        "labels",
        "no-labels",
        "top-k",
        "threads",
        "image-directory",
        "model-directory",
    ],
)
def test_bad_input_fails_with_one_sentence(workdir, make_args, message):
    root, _, _ = workdir
    (root / "two.txt").write_text("red\ngreen\n")
    result = run_runner(*make_args(root))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if "run_tflite.py: error:" in line]
    assert len(ours) == 1
    assert message in ours[0]
    assert ours[0].count(". ") == 0 and ours[0].endswith(".")
