"""Tests for pibconv_tf.deploy.device_report and the report `export_model` writes.

Two tiny networks (2 cells, C=4, 16x16) are exported once for the module: PIBCONV (GELU in
its PIBConv blocks) as float32 and full-integer int8, DARTS_V2 (ReLU only) as int8.
"""

import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pibconv_tf import data
from pibconv_tf.deploy import device_report, export, microcontroller, tflite
from pibconv_tf.model import genotypes, networks

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")

RUNNER = Path(__file__).resolve().parents[1] / "edge" / "run_tflite.py"
SIZE = 16
FORMATS = {"PIBCONV": ("tflite_fp32", "tflite_int8"), "DARTS_V2": ("tflite_int8",)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{genotype name: export directory}, with a device report of 3 runs at 1 and 2 threads."""
    digits = data.load_source("digits", image_size=SIZE, seed=0)
    directories = {}
    for name, formats in FORMATS.items():
        root = tmp_path_factory.mktemp(name)
        keras.utils.set_random_seed(0)
        model = networks.network_cifar(
            genotypes.NAMED_GENOTYPES[name], layers=2, init_channels=4, image_size=SIZE
        )
        model.save(root / "model.keras")
        (root / "dataset.json").write_text(json.dumps(digits.info.to_json_dict()))
        config = export.ExportConfig(
            model=str(root / "model.keras"),
            output_dir=str(root / "export"),
            formats=formats,
            dataset="digits",
            calibration_images=16,
            parity_images=8,
            device_report_runs=3,
            device_report_threads=(1, 2),
        )
        export.export_model(config)
        directories[name] = root / "export"
    return directories


def read_report(directory):
    return json.loads((directory / device_report.JSON).read_text())


def markdown_section(text, name):
    """The lines of `## name ...` up to the next section."""
    section = text.split(f"## {name} ")[1].split("\n## ")[0]
    return section.splitlines()


def test_report_lists_every_operator_of_every_model(exports):
    for genotype, directory in exports.items():
        report = read_report(directory)
        metadata = json.loads((directory / "metadata.json").read_text())
        assert set(report["models"]) == set(FORMATS[genotype])
        markdown = (directory / device_report.MARKDOWN).read_text()
        for fmt, model in report["models"].items():
            path = directory / model["file"]
            counts = {row["op"]: row["count"] for row in model["operators"]}
            assert counts == tflite.op_counts(path) == metadata["artifacts"][fmt]["ops"]
            assert model["bytes"] == path.stat().st_size
            assert model["nodes"] == sum(counts.values())
            assert all(row["builtin"] for row in model["operators"])
            # One markdown row per operator, with its count, in the model's own section.
            rows = [line for line in markdown_section(markdown, fmt) if line.startswith("| ")]
            table = {
                r.split(" | ")[0][2:]: int(r.split(" | ")[1]) for r in rows[1 : len(counts) + 1]
            }
            assert table == counts


def test_gelu_has_no_tflite_micro_kernel(exports):
    model = read_report(exports["PIBCONV"])["models"]["tflite_int8"]
    rows = {row["op"]: row for row in model["operators"]}
    assert rows["GELU"]["tflite_micro"] is False and rows["GELU"]["tflite_micro_resolver"] is None
    assert rows["CONV_2D"]["tflite_micro_resolver"] == "AddConv2D"
    assert model["tflite_micro"] == {
        "runs": False,
        "missing": ["GELU"],
        "source": device_report.TFLM_SOURCE,
    }
    assert any("#3218" in note and "DARTS_V2" in note for note in model["notes"])
    markdown = (exports["PIBCONV"] / device_report.MARKDOWN).read_text()
    assert "| GELU | " in markdown and "no kernel" in markdown and "no: GELU" in markdown


def test_relu_only_darts_v2_runs_on_tflite_micro(exports):
    model = read_report(exports["DARTS_V2"])["models"]["tflite_int8"]
    ops = {row["op"] for row in model["operators"]}
    assert "GELU" not in ops and "RELU" in ops
    assert ops <= microcontroller.TFLM_BUILTIN_OPS
    assert model["tflite_micro"]["runs"] is True and model["tflite_micro"]["missing"] == []
    assert model["notes"] == []
    # The summary table, above the per-model sections, says so.
    summary = (exports["DARTS_V2"] / device_report.MARKDOWN).read_text().split("\n## ")[0]
    line = next(x for x in summary.splitlines() if x.startswith("| tflite_int8 |"))
    assert line.split(" | ")[4] == "yes"


def test_xnnpack_status_is_measured_per_node(exports):
    for directory in exports.values():
        for fmt, model in read_report(directory)["models"].items():
            xnn = model["xnnpack"]
            rows = model["operators"]
            assert xnn["delegated_nodes"] == sum(row["xnnpack_nodes"] for row in rows)
            assert 0 < xnn["delegated_nodes"] <= xnn["nodes"] and xnn["partitions"] >= 1
            for row in rows:
                taken, count = row["xnnpack_nodes"], row["count"]
                expected = "yes" if taken == count else "no" if not taken else f"{taken} of {count}"
                assert row["xnnpack"] == expected
            convs = next(row for row in rows if row["op"] == "CONV_2D")
            assert convs["xnnpack"] == "yes", fmt
    # docs/performance.md timed int8 RELU in TFLite's reference kernel: XNNPACK leaves it.
    int8 = read_report(exports["DARTS_V2"])["models"]["tflite_int8"]
    relu = next(row for row in int8["operators"] if row["op"] == "RELU")
    assert relu["xnnpack"] == "no"


def test_arena_estimate_lies_between_one_operator_and_all_activations(exports):
    for directory in exports.values():
        for model in read_report(directory)["models"].values():
            content = (directory / model["file"]).read_bytes()
            graph = device_report.graph(content)
            memory = model["memory"]
            activations = [t for t in graph["bytes"] if t not in graph["constant"]]
            assert memory["upper_bound_bytes"] <= sum(graph["bytes"][t] for t in activations)
            # An operator's non-constant inputs and outputs are live together.
            widest = max(
                sum(graph["bytes"][t] for t in {*reads, *writes} if t not in graph["constant"])
                for _, reads, writes in graph["ops"]
            )
            assert 0 < widest <= memory["peak_bytes"] <= memory["upper_bound_bytes"]
            assert 0 < memory["constant_bytes"] < model["bytes"]


def test_activation_memory_follows_liveness():
    # x -> conv(w) -> a -> relu -> b -> add(x, b) -> y: x stays live until the add.
    ops = [("CONV_2D", [0, 9], [1]), ("RELU", [1], [2]), ("ADD", [0, 2], [3])]
    sizes = {0: 100, 1: 40, 2: 30, 3: 7, 9: 1000}
    memory = device_report.activation_memory(ops, sizes, {9}, inputs=[0], outputs=[3])
    assert memory["peak_bytes"] == 100 + 40 + 30  # at the RELU: x, a and b
    assert memory["upper_bound_bytes"] == 177
    assert memory["peak_op"] == "#1 RELU"
    # Without the skip connection x is freed after the convolution.
    ops[2] = ("ADD", [2, 2], [3])
    memory = device_report.activation_memory(ops, sizes, {9}, inputs=[0], outputs=[3])
    assert memory["peak_bytes"] == 140 and memory["peak_op"] == "#0 CONV_2D"


def test_latency_table_has_a_row_per_thread_count(exports):
    model = read_report(exports["PIBCONV"])["models"]["tflite_fp32"]
    assert [row["threads"] for row in model["latency"]] == [1, 2]
    for row in model["latency"]:
        assert row["runs"] == 3 and row["batch_size"] == 1
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
    markdown = markdown_section(
        (exports["PIBCONV"] / device_report.MARKDOWN).read_text(), "tflite_fp32"
    )
    header = "| " + " | ".join(h for _, h, _, _ in device_report.LATENCY_COLUMNS) + " |"
    start = markdown.index(header)
    assert [line.split(" | ")[0] for line in markdown[start + 2 : start + 4]] == ["| 1", "| 2"]
    table = device_report.format_latency(model["latency"], "model_fp32.tflite").splitlines()
    assert len(table) == 3 and table[1].split()[:2] == ["model_fp32.tflite", "1"]


def test_resolver_methods_follow_tflite_micro_names():
    assert microcontroller.resolver_method("CONV_2D") == "AddConv2D"
    assert microcontroller.resolver_method("PADV2") == "AddPadV2"
    assert microcontroller.resolver_method("BATCH_MATMUL") == "AddBatchMatMul"
    assert microcontroller.tflm_missing(["GELU", "CONV_2D", "GELU", "FlexErf"]) == [
        "FlexErf",
        "GELU",
    ]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I"])
def test_edge_runner_classifies_any_image_mode_on_every_variant(exports, tmp_path, mode):
    spec = importlib.util.spec_from_file_location("run_tflite", RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    rgb = np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    suffix = {"CMYK": "jpg", "I": "tif"}.get(mode, "png")  # formats that hold the mode
    path = tmp_path / f"odd.{suffix}"
    Image.fromarray(rgb).convert(mode).save(path)
    for directory in exports.values():
        for file in sorted(directory.glob("*.tflite")):
            interpreter = runner.load_interpreter(str(file), 1)
            pixels = runner.load_images([str(path)], *runner.input_size(interpreter))
            assert pixels.shape == (1, SIZE, SIZE, 3) and pixels.dtype == np.uint8
            probabilities = runner.classify(interpreter, pixels)
            assert probabilities.shape == (1, 10)
            np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-5)


def test_a_failing_report_leaves_the_previous_files_whole(exports, monkeypatch):
    directory = exports["PIBCONV"]
    before = {
        name: (directory / name).read_bytes()
        for name in (device_report.JSON, device_report.MARKDOWN)
    }

    def broken(report):
        raise RuntimeError("formatting failed")

    monkeypatch.setattr(device_report, "format_markdown", broken)
    with pytest.raises(RuntimeError, match="formatting failed"):
        device_report.device_report(sorted(directory.glob("*.tflite")), runs=0)
    for name, content in before.items():
        assert (directory / name).read_bytes() == content
    assert not list(directory.glob(".device_report*"))  # no temporary files left
