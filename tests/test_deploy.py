"""Tests for pibconv_tf.deploy (export, tflite), and the apps.export binary.

Tiny networks (2 cells, C=4, 16x16 inputs) with random weights and BatchNorm statistics are
exported; their artifacts must compute what Keras computes on the same raw pixels.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pibconv_tf import data
from pibconv_tf.deploy import export, microcontroller, tflite
from pibconv_tf.errors import RunError, UserInputError
from pibconv_tf.model import genotypes, networks, pib_conv
from pibconv_tf.model import operations as ops
from tests import app_process

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "edge" / "run_tflite.py"
SIZE = 16
TOLERANCE = 1e-4


def tiny_network(genotype_name, seed=0):
    """A 2-cell network whose BatchNorms hold non-trivial moving statistics."""
    keras.utils.set_random_seed(seed)
    model = networks.network_cifar(
        genotypes.NAMED_GENOTYPES[genotype_name], layers=2, init_channels=4, image_size=SIZE
    )
    rng = np.random.default_rng(seed)
    for variable in model.non_trainable_variables:
        if variable.path.endswith("moving_variance"):
            variable.assign(rng.uniform(0.5, 2.0, variable.shape))
        elif variable.path.endswith("moving_mean"):
            variable.assign(rng.normal(0.0, 0.5, variable.shape))
    return model


@pytest.fixture(scope="module")
def digits():
    return data.load_source("digits", image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, digits):
    """{genotype name: path of a saved tiny model.keras with dataset.json beside it}."""
    paths = {}
    for name in ("PIBCONV", "DARTS_V2"):
        directory = tmp_path_factory.mktemp(name)
        tiny_network(name).save(directory / "model.keras")
        (directory / "dataset.json").write_text(json.dumps(digits.info.to_json_dict()))
        paths[name] = directory / "model.keras"
    return paths


@pytest.fixture(scope="module")
def images(digits):
    """8 random-pixel images followed by 8 digits test images, uint8."""
    noise = np.random.default_rng(1).integers(0, 256, (8, SIZE, SIZE, 3)).astype(np.uint8)
    return np.concatenate([noise, digits.numpy("test", limit=8)[0]])


def serving_info(info):
    return export.ServingInfo(SIZE, info.mean, info.std, info.class_names, "dataset")


@pytest.fixture(scope="module")
def fp32_tflite(model_files, digits):
    """Memoised tflite_fp32 bytes per (genotype name, PIBConv implementation)."""
    cache = {}

    def get(genotype_name, implementation="depthwise"):
        key = (genotype_name, implementation)
        if key not in cache:
            path = model_files[genotype_name]
            config = export.ExportConfig(
                model=str(path), output_dir="unused", pib_implementation=implementation
            )
            info = serving_info(digits.info)
            [(_, cache[key])] = export.build_tflite(config, info, ["tflite_fp32"])
        return cache[key]

    return get


def keras_logits(path, info, pixels):
    model = export.load_inference_model(path)
    return np.asarray(model(info.normalize(pixels), training=False))


def assert_float32_parity(actual, expected):
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_array_equal(np.argmax(actual, -1), np.argmax(expected, -1))


def count_batch_norms(model):
    layers = model._flatten_layers(include_self=False, recursive=True)
    return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)


@pytest.mark.parametrize("pool_type", ["max", "avg"])
@pytest.mark.parametrize("size", [8, 7])
def test_quantizable_pool_computes_pool3x3(pool_type, size):
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    pool = ops.Pool3x3(pool_type, strides=2)
    expected = np.asarray(pool(x))
    pool.__class__ = tflite.QuantizablePool3x3
    np.testing.assert_allclose(np.asarray(pool(x)), expected, atol=1e-6)


@pytest.mark.parametrize("genotype_name, max_pools", [("DARTS_V2", True), ("PIBCONV", False)])
def test_make_pools_quantizable_switches_stride_2_max_pools_only(genotype_name, max_pools):
    # Average pools keep their stride-2 form: a stride-1 pool at every pixel would cost
    # 4x the work in the one operation XNNPACK has no int8 kernel for.
    model = tiny_network(genotype_name)
    pools = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, ops.Pool3x3)
    ]
    switched = tflite.make_pools_quantizable(model)
    wanted = [p.strides == 2 and p.pool_type == "max" for p in pools]
    assert switched == sum(wanted)
    assert [isinstance(p, tflite.QuantizablePool3x3) for p in pools] == wanted
    # DARTS_V2 reduces with max pools, PIBCONV with average pools (which stay).
    assert (switched > 0) == max_pools
    assert any(p.pool_type == "avg" and p.strides == 2 for p in pools) != max_pools


@pytest.mark.parametrize(
    "genotype_name, implementation",
    [("PIBCONV", "depthwise"), ("PIBCONV", "grouped"), ("DARTS_V2", None)],
)
def test_saved_model_signatures_match_keras(
    tmp_path, model_files, digits, images, genotype_name, implementation
):
    path = model_files[genotype_name]
    info = serving_info(digits.info)
    expected = keras_logits(path, info, images)
    model = export.load_inference_model(path, implementation)
    export.write_saved_model(model, info, tmp_path / "saved_model")
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    float_out = loaded.signatures["serving_default"](images=tf.constant(images, tf.float32))
    uint8_out = loaded.signatures["serving_uint8"](images=tf.constant(images))
    assert_float32_parity(float_out["logits"].numpy(), expected)
    assert_float32_parity(uint8_out["logits"].numpy(), expected)
    np.testing.assert_allclose(
        float_out["probabilities"].numpy(), tf.nn.softmax(expected).numpy(), atol=1e-6
    )


def test_split_pib_conv_computes_pib_conv(model_files, digits, images):
    path = model_files["PIBCONV"]
    info = serving_info(digits.info)
    model = export.load_inference_model(path)
    assert tflite.make_pib_convs_split(model) == sum(
        isinstance(layer, pib_conv.PIBConv)
        for layer in model._flatten_layers(include_self=False, recursive=True)
    )
    actual = np.asarray(model(info.normalize(images), training=False))
    np.testing.assert_allclose(actual, keras_logits(path, info, images), atol=1e-6)


@pytest.mark.parametrize(
    "genotype_name, implementation",
    [
        ("PIBCONV", "split"),
        ("PIBCONV", "depthwise"),
        ("PIBCONV", "grouped"),
        ("DARTS_V2", "split"),
    ],
)
def test_fp32_tflite_matches_keras(
    model_files, digits, images, fp32_tflite, genotype_name, implementation
):
    path = model_files[genotype_name]
    expected = keras_logits(path, serving_info(digits.info), images)
    content = fp32_tflite(genotype_name, implementation)
    assert_float32_parity(tflite.tflite_logits(content, images), expected)

    counts = tflite.op_counts(content)
    assert not [name for name in counts if "Flex" in name or "CUSTOM" in name]
    # BatchNorm folded into the convolutions: no rsqrt, and fewer multiplies than norms.
    assert "RSQRT" not in counts
    assert counts.get("MUL", 0) < count_batch_norms(export.load_inference_model(path))
    if genotype_name == "PIBCONV" and implementation != "depthwise":
        # split: channel halves added (no 5-D RESHAPE + SUM); grouped: one CONV_2D each.
        assert "SUM" not in counts
        layers = export.load_inference_model(path)._flatten_layers(include_self=False)
        pib_convs = sum(isinstance(layer, pib_conv.PIBConv) for layer in layers)
        split = tflite.op_counts(fp32_tflite(genotype_name, "split"))
        if implementation == "split":
            assert counts["STRIDED_SLICE"] >= 2 * pib_convs
        else:
            assert counts["CONV_2D"] == split["CONV_2D"] + pib_convs


def calibrated_tflite(path, digits, fmt, **config):
    """`fmt` of the model at `path`, calibrated on 16 digits train images; (bytes, info)."""
    info = serving_info(digits.info)
    calibration = digits.numpy("train", limit=16)[0]
    config = export.ExportConfig(model=str(path), output_dir="unused", **config)
    [(_, content)] = export.build_tflite(config, info, [fmt], calibration)
    return content, info


@pytest.mark.parametrize("genotype_name, io_type", [("PIBCONV", "uint8"), ("DARTS_V2", "int8")])
def test_full_int8_has_integer_io_and_builtin_ops(
    model_files, digits, images, genotype_name, io_type
):
    path = model_files[genotype_name]
    content, info = calibrated_tflite(path, digits, "tflite_int8", int8_io_type=io_type)

    details = tflite.io_details(content)
    assert details["input"]["dtype"] == io_type
    assert details["outputs"]["logits"]["dtype"] == io_type
    # Raw pixels 0..255 map exactly onto the integer input.
    assert details["input"]["scale"] == pytest.approx(1.0, abs=0.01)
    counts = tflite.op_counts(content)
    assert not [name for name in counts if "Flex" in name or "CUSTOM" in name]
    assert "PADV2" not in counts  # the -inf padded max pool took its quantizable form

    expected = keras_logits(path, info, images)
    logits = tflite.tflite_logits(content, images)
    report = tflite.parity_report(expected, {"tflite_int8": logits}, tolerance=TOLERANCE)
    row = report["artifacts"]["tflite_int8"]
    agreement = np.mean(np.argmax(logits, -1) == np.argmax(expected, -1))
    assert row["top1_agreement"] == pytest.approx(agreement)
    # Quantized, yet not saturated: the logits follow Keras' within a fraction of their range.
    assert row["max_abs_logit_diff"] < 0.25 * np.ptp(expected)


@pytest.mark.parametrize("genotype_name, int8_io", [("PIBCONV", True), ("DARTS_V2", False)])
def test_mixed_int8_keeps_the_slow_operations_float(
    model_files, digits, images, genotype_name, int8_io
):
    path = model_files[genotype_name]
    content, info = calibrated_tflite(path, digits, "tflite_int8_mixed", int8_io=int8_io)

    details = tflite.io_details(content)
    assert details["input"]["dtype"] == ("uint8" if int8_io else "float32")
    assert details["outputs"]["logits"]["dtype"] == ("uint8" if int8_io else "float32")
    if int8_io:  # as tflite_int8: raw pixels map exactly onto the integer input
        assert details["input"]["scale"] == pytest.approx(1.0, abs=0.01)
    interpreter = tflite._interpreter(content, delegates=False)
    types = {}
    for op in interpreter._get_ops_details():
        first = interpreter._get_tensor_details(op["inputs"][0], 0)["dtype"]
        types.setdefault(op["op_name"], set()).add(np.dtype(first).name)
    for name in tflite.MIXED_FLOAT_OPS:
        assert types.get(name, {"float32"}) == {"float32"}, name
    assert types["CONV_2D"] == {"int8"} and types["ADD"] == {"int8"}
    assert "RELU" in types and (genotype_name != "PIBCONV" or "AVERAGE_POOL_2D" in types)

    expected = keras_logits(path, info, images)
    logits = tflite.tflite_logits(content, images)
    report = tflite.parity_report(expected, {"mixed": logits}, tolerance=TOLERANCE)
    assert report["artifacts"]["mixed"]["max_abs_logit_diff"] < 0.25 * np.ptp(expected)


def test_int8_without_calibration_images_is_refused():
    with pytest.raises(ValueError, match="representative"):
        tflite.convert("unused", "tflite_int8", representative_images=None)


def test_parity_report_checks_tolerance_and_near_ties():
    keras_out = np.array([[2.0, 0.0, -1.0], [1.0, 1.00005, 0.0], [0.0, 3.0, 1.0]])
    close = keras_out + 2e-5
    close[1] = [1.00004, 1.00003, 0.0]  # a near tie flips within tolerance
    far = keras_out.copy()
    far[2, 1] -= 5.0
    outputs = {"tflite_fp32": close, "tflite_fp16": far, "saved_model": far}
    report = tflite.parity_report(
        keras_out, outputs, labels=[0, 1, 2], tolerance=1e-4, checked=("tflite_fp32", "saved_model")
    )
    rows = report["artifacts"]
    assert rows["keras"]["accuracy"] == pytest.approx(2 / 3)
    assert rows["tflite_fp32"]["passed"] is True
    assert rows["tflite_fp32"]["top1_agreement"] == pytest.approx(2 / 3)
    assert rows["saved_model"]["passed"] is False
    assert "passed" not in rows["tflite_fp16"]
    assert rows["tflite_fp16"]["max_abs_logit_diff"] == pytest.approx(5.0)
    with pytest.raises(RunError, match="saved_model"):
        tflite.check_parity(report)
    assert "FAILED" in tflite.format_parity(report)


def test_check_builtin_ops_rejects_flex_ops():
    tflite.check_builtin_ops({"CONV_2D": 3}, "tflite_fp32")
    with pytest.raises(RunError, match="FlexErf"):
        tflite.check_builtin_ops({"CONV_2D": 3, "FlexErf": 1}, "tflite_fp32")


def test_serving_info_precedence(model_files, digits):
    path = model_files["PIBCONV"]
    model = export.load_inference_model(path)
    base = export.ExportConfig(model=str(path), output_dir="unused")
    other = data.DatasetInfo("other", tuple("abcdefghij"), SIZE, 3, (0.1,) * 3, (0.2,) * 3, 0, 1, 1)
    beside = export.resolve_serving_info(model, str(path), base, other)
    assert (beside.mean, beside.source) == (digits.info.mean, "dataset.json")
    assert beside.class_names == digits.info.class_names
    flags = export.ExportConfig(
        model=str(path), output_dir="unused", mean=(0.5,) * 3, std=(0.25,) * 3
    )
    given = export.resolve_serving_info(model, str(path), flags, other)
    assert (given.mean, given.std, given.source) == ((0.5,) * 3, (0.25,) * 3, "flags")
    wrong = export.ExportConfig(model=str(path), output_dir="unused", class_names=("a", "b"))
    with pytest.raises(UserInputError, match="10 classes"):
        export.resolve_serving_info(model, str(path), wrong, other)


def test_serving_info_needs_normalisation(tmp_path):
    path = tmp_path / "model.keras"
    tiny_network("PIBCONV").save(path)
    model = export.load_inference_model(path)
    config = export.ExportConfig(model=str(path), output_dir="unused")
    with pytest.raises(UserInputError, match="--mean and --std"):
        export.resolve_serving_info(model, str(path), config)
    info = export.resolve_serving_info(
        model, str(path), export.ExportConfig(str(path), "unused", mean=(0,) * 3, std=(1,) * 3)
    )
    assert info.class_names == tuple(str(i) for i in range(10))


def test_output_dir_holding_the_model_is_never_cleared(model_files):
    path = model_files["PIBCONV"]
    with pytest.raises(UserInputError, match="holds the input"):
        export.prepare_output_dir(path.parent, overwrite=True, protect=[path])
    assert path.is_file()


def test_benchmark_tflite_reports_latency(tmp_path, fp32_tflite):
    content = fp32_tflite("PIBCONV")
    path = tmp_path / "model.tflite"
    path.write_bytes(content)
    stats = tflite.benchmark_tflite(path, threads=1, warmup=2, runs=5)
    assert stats["runs"] == 5 and stats["threads"] == 1 and stats["bytes"] == len(content)
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["cpu_ms"] > 0


def app_command(*args):
    return [sys.executable, "-m", "apps.export", *map(str, args)]


def run_app(*args):
    return app_process.run_app("apps.export", *map(str, args))


@pytest.mark.slow
def test_app_writes_artifacts_metadata_and_parity(tmp_path, model_files, digits):
    model_path = model_files["PIBCONV"]
    output_dir = tmp_path / "export"
    formats = ",".join(export.FORMATS)
    result = run_app(
        f"--model={model_path}",
        f"--output_dir={output_dir}",
        f"--formats={formats}",
        "--dataset=digits",
        f"--image_size={SIZE}",
        "--calibration_images=16",
        "--parity_images=24",
    )
    assert result.returncode == 0, result.stderr
    assert "tflite_fp32" in result.stdout and "ok" in result.stdout

    class_names = list(digits.info.class_names)
    assert (output_dir / "labels.txt").read_text().splitlines() == class_names

    metadata = json.loads((output_dir / "metadata.json").read_text())
    assert metadata["model"]["genotype"] == genotypes.PIBCONV.to_dict()
    assert (metadata["model"]["layers"], metadata["model"]["init_channels"]) == (2, 4)
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert metadata["model"]["sha256"] == digest
    assert metadata["input"]["shape"] == [None, SIZE, SIZE, 3]
    assert metadata["normalization"]["mean"] == list(digits.info.mean)
    assert metadata["normalization"]["std"] == list(digits.info.std)
    assert metadata["class_names"] == class_names
    assert metadata["formats"] == formats.split(",")
    assert metadata["versions"]["tensorflow"] == tf.__version__
    for fmt in tflite.TFLITE_FORMATS:
        artifact = metadata["artifacts"][fmt]
        assert artifact["bytes"] == os.path.getsize(output_dir / artifact["path"])
    for name in ("tflite_int8", "tflite_int8_mixed"):
        assert metadata["artifacts"][name]["input"]["dtype"] == "uint8"
    assert metadata["calibration"]["images"] == 16

    parity = json.loads((output_dir / "parity.json").read_text())
    rows = parity["artifacts"]
    assert set(rows) == {"keras", "saved_model_uint8", *export.DEFAULT_FORMATS}
    assert parity["images"] == {"source": "digits:test", "count": 24}
    for name in ("saved_model", "saved_model_uint8", "tflite_fp32"):
        assert rows[name]["passed"] and rows[name]["max_abs_logit_diff"] <= TOLERANCE
    keras_out = keras_logits(model_path, serving_info(digits.info), digits.numpy("test", 24)[0])
    for name in ("tflite_fp16", "tflite_dynamic_int8", "tflite_int8", "tflite_int8_mixed"):
        assert set(rows[name]) == {
            "max_abs_logit_diff",
            "mean_abs_logit_diff",
            "top1_agreement",
            "accuracy",
        }
        assert 0 < rows[name]["max_abs_logit_diff"] < 0.25 * np.ptp(keras_out), name
        # A share of the 24 parity images.
        agreed = rows[name]["top1_agreement"] * 24
        assert abs(agreed - round(agreed)) < 1e-6, (name, rows[name])
    config = json.loads((output_dir / "config.json").read_text())
    assert config["dataset"] == "digits" and config["calibration_images"] == 16

    check_edge_runner(output_dir, model_path, digits)
    check_c_array(output_dir, metadata["artifacts"], tmp_path)


def check_c_array(output_dir, artifacts, tmp_path):
    """`model_data.cc/.h` compile, hold the int8 model's bytes, and register its operators."""
    compiler = shutil.which("c++") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine to compile model_data.cc")
    artifact = artifacts[microcontroller.C_ARRAY]
    model = (output_dir / artifacts["tflite_int8"]["path"]).read_bytes()
    assert artifact["bytes"] == len(model)
    assert artifact["operators"] == sorted(artifacts["tflite_int8"]["ops"])
    assert "AddConv2D" in artifact["resolver"] and "AddQuantize" in artifact["resolver"]
    # A stand-in for tflite::MicroMutableOpResolver with the methods the header names.
    methods = "".join(f"  void {name}() {{ ++added; }}\n" for name in artifact["resolver"])
    (tmp_path / "main.cc").write_text(
        f"""#include <cstdio>
#include "model_data.h"
struct Resolver {{
  int added = 0;
{methods}}};
int main() {{
  Resolver resolver;
  PIBCONV_ADD_MODEL_OPERATORS(resolver);
  unsigned long sum = 0;
  for (unsigned int i = 0; i < g_model_data_len; ++i) sum = (sum * 31 + g_model_data[i]) % 1000003;
  std::printf("%u %lu %d %d\\n", g_model_data_len, sum, resolver.added, kModelOperatorCount);
  return 0;
}}
"""
    )
    source = output_dir / microcontroller.SOURCE
    subprocess.run(
        [compiler, "-std=c++11", "-c", str(source), "-o", str(tmp_path / "model_data.o")],
        check=True,
        capture_output=True,
    )
    binary = tmp_path / "main"
    subprocess.run(
        [compiler, "-std=c++11", f"-I{output_dir}", str(tmp_path / "main.cc"), str(source)]
        + ["-o", str(binary)],
        check=True,
        capture_output=True,
    )
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    expected = 0
    for byte in model:
        expected = (expected * 31 + byte) % 1000003
    count = len(artifact["resolver"])
    assert printed.split() == [str(len(model)), str(expected), str(count), str(count)]


def check_edge_runner(output_dir, model_path, digits):
    """The device runner (no TensorFlow) classifies PNG files as Keras does."""
    if not RUNNER.exists():
        pytest.skip("edge/run_tflite.py is not in the tree")
    pixels, _ = digits.numpy("test", limit=3)
    files = []
    for index, image in enumerate(pixels):
        files.append(output_dir / f"digit_{index}.png")
        Image.fromarray(image).save(files[-1])
    result = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            f"--model={output_dir / 'model_fp32.tflite'}",
            f"--labels={output_dir / 'labels.txt'}",
            "--top_k=10",
            "--json",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    probabilities = np.zeros((len(files), 10))
    for row, entry in enumerate(json.loads(result.stdout)):
        for item in entry["top_k"]:
            probabilities[row, item["index"]] = item["probability"]
    info = export.ServingInfo(SIZE, digits.info.mean, digits.info.std, (), "dataset")
    model = export.load_inference_model(model_path)
    expected = tf.nn.softmax(model(info.normalize(pixels), training=False)).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.mark.slow
def test_app_refuses_bad_input_without_writing(tmp_path, model_files):
    model = model_files["PIBCONV"]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = {
        "not empty": ([f"--model={model}"], "--overwrite"),
        "format": ([f"--model={model}", "--formats=tflite_fp32,onnx"], "onnx"),
        "model": (["--model=/nonexistent/model.keras"], "does not exist"),
        "int8": ([f"--model={model}", "--formats=tflite_int8"], "--dataset"),
        "int8_mixed": ([f"--model={model}", "--formats=tflite_int8_mixed"], "--dataset"),
    }
    output_dirs = {name: tmp_path / name for name in cases}
    output_dirs["not empty"] = occupied
    # The runs are independent: start them together.
    processes = {
        name: subprocess.Popen(
            app_command(*args, f"--output_dir={output_dirs[name]}"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in cases.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, (name, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and cases[name][1] in errors[0], (name, stderr)
        assert "Traceback" not in stderr
        if name != "not empty":
            assert not output_dirs[name].exists(), name
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert (occupied / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "dtype, quantization, expected",
    [
        (np.float32, (0.0, 0), [0.0, 128.0, 255.0]),
        (np.uint8, (1.0, 0), [0, 128, 255]),
        (np.int8, (1.0, -128), [-128, 0, 127]),
        (np.int8, (2.0, 0), [0, 64, 127]),  # 255 / 2 rounds to 128: clipped
        (np.int32, (0.0, 0), [0, 128, 255]),  # an integer input that is not quantized
    ],
)
def test_pixels_take_the_input_tensors_type(dtype, quantization, expected):
    pixels = np.array([0, 128, 255], np.uint8)
    got = tflite.quantize_pixels(pixels, {"dtype": dtype, "quantization": quantization})
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.array(expected, dtype))
