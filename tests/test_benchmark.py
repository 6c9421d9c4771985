"""Tests for benchmarks/harness.py, pibconv_tf/deploy/latency.py and apps.benchmark.

The app runs every kind of measurement at tiny sizes in subprocesses; the figures are never
asserted, only that records are well formed, complete and positive. The library's
expansion, statistics, reference matching and table are tested directly.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import harness
from pibconv_tf.deploy import latency as timing
from pibconv_tf.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--layers=2",
    "--init_channels=4",
    "--batch_size=2",
    "--repeats=1",
    "--warmup=1",
    "--min_repeat_seconds=0",
    "--image_size=16",
]
COMMON_KEYS = {
    "what", "name", "status", "config", "unit", "median", "min", "max", "ms_per_call",
    "images_per_second", "peak_rss_mb", "peak_rss_scope", "device", "versions", "timestamp",
    "load_average", "threads",
}  # fmt: skip


def run_app(*flags):
    return subprocess.run(
        [sys.executable, "-m", "apps.benchmark", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def read_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def check_ok(record):
    assert set(record) >= COMMON_KEYS, sorted(COMMON_KEYS - set(record))
    assert record["status"] == "ok", record.get("reason")
    assert 0 < record["min"] <= record["median"] <= record["max"]
    assert record["peak_rss_mb"] > 10
    assert record["versions"]["python"] and record["versions"]["tensorflow"]
    for key in ("median", "min", "max"):
        assert record["ms_per_call"][key] > 0


@pytest.mark.slow
def test_app_measures_steps_inference_and_pipelines(tmp_path):
    output = tmp_path / "bench" / "results.jsonl"
    result = run_app(
        *TINY,
        "--what=search_step,train_step,inference,pipeline",
        "--order=first",
        "--search_layers=1",
        "--search_init_channels=4",
        "--search_batch_size=2",
        "--search_nodes=1",
        "--nojit_compile",
        "--inference_batch_sizes=1",
        "--pipeline_images=16",
        "--noisolate",
        f"--output={output}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_records(output)
    kinds = [(r["what"], r["config"].get("mode") or r["config"].get("pipeline")) for r in records]
    assert kinds == [
        ("search_step", None),
        ("train_step", None),
        ("train_step", None),  # mixed_float16: skipped on a CPU
        *[("inference", mode) for mode in harness.INFERENCE_MODES],
        ("pipeline", "train"),
        ("pipeline", "search"),
    ]
    skipped = records[2]
    assert skipped["status"] == "skipped" and "GPU" in skipped["reason"]
    for record in records[:2] + records[3:]:
        check_ok(record)
    assert records[0]["unit"] == records[1]["unit"] == "images/s"
    # Where the search step's memory goes: the resident set after each stage, each within
    # the peak (Linux' /proc).
    stages = records[0]["resident_mb_after"]
    assert list(stages) == ["start", "build", "compile", "trace", "first_step"]
    assert stages["start"] > 10 and max(stages.values()) <= records[0]["peak_rss_mb"] + 1
    assert {r["unit"] for r in records if r["what"] == "inference"} == {"ms"}
    assert [r["config"]["batch_size"] for r in records[3:6]] == [1, 1, 1]
    assert records[-2]["images_per_epoch"] == 16 // 2 * 2
    assert {r["graph_optimizer"] for r in records} == {False}  # auto on a CPU: off
    config = json.loads((output.parent / "config.json").read_text())
    assert config["what"] == ["search_step", "train_step", "inference", "pipeline"]
    # The table: one row per record and the pipeline / train-step ratio.
    assert result.stdout.count("\n") >= len(records) + 2
    # The ratio line: the train pipeline's images/s over the train step's, from the records.
    pipeline = next(r for r in records if r["what"] == "pipeline" and r["name"].startswith("train"))
    step = next(
        r
        for r in records
        if r["what"] == "train_step"
        and r["status"] == "ok"
        and r["config"]["batch_size"] == pipeline["config"]["batch_size"]
    )
    factor = pipeline["median"] / step["median"]
    verdict = "outruns" if factor > 1 else "is SLOWER than"
    assert f"{pipeline['name']} {verdict} {step['name']}: {factor:.1f}x" in result.stdout


@pytest.mark.slow
def test_app_times_tflite_in_litert_processes(tmp_path):
    output = tmp_path / "tflite.jsonl"
    output.write_text("")  # appended to
    result = run_app(
        *TINY,
        "--what=tflite",
        "--tflite_formats=tflite_fp32,tflite_int8",
        "--tflite_threads=1",
        "--eval_images=4",
        f"--output={output}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_records(output)
    assert [r["config"]["format"] for r in records] == ["tflite_fp32", "tflite_int8"]
    for record in records:
        check_ok(record)
        assert record["unit"] == "ms" and record["peak_rss_scope"] == "measurement"
        assert record["bytes"] > 1000 and record["config"]["threads"] == 1
        # A share of the 4 evaluation images.
        agreed = record["top1_agreement_with_fp32"] * 4
        assert agreed == round(agreed) and record["eval_images"] == 4
    assert records[0]["top1_agreement_with_fp32"] == 1.0
    assert records[1]["input_dtype"] == "uint8"
    # The timing processes import LiteRT only: much less memory than the converting one.
    assert records[0]["peak_rss_mb"] < 400
    assert "x the speed of fp32" in result.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--what=speed"], "--what 'speed' holds unknown or no values ['speed']"),
        (["--repeats=0"], "--repeats must be >= 1, got 0."),
        (["--layers=2,x"], "--layers '2,x' must list whole numbers."),
        (["--tflite_threads=0"], "--tflite_threads must list integers >= 1"),
        (["--model=/no/such/model.keras"], "--model '/no/such/model.keras' does not exist"),
    ],
)
def test_app_refuses_bad_input_in_one_sentence(tmp_path, flags, message):
    output = tmp_path / "results.jsonl"
    output.write_text("kept\n")
    result = run_app(*flags, f"--output={output}", "--overwrite")
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-1000:]
    assert "Traceback" not in result.stderr
    assert output.read_text() == "kept\n"  # bad input touches no output


def test_specs_expand_sizes_and_variants():
    config = harness.BenchmarkConfig(
        layers=(2, 10), precisions=("float32",), jit_compile_modes=(False, True), order=("first",)
    ).validate()
    specs = harness.measurement_specs(config)
    whats = [s["what"] for s in specs]
    assert (
        whats
        == ["search_step"]
        + ["train_step"] * 4
        + ["inference"] * 2
        + ["tflite"] * 2
        + ["pipeline"] * 2
    )
    trains = [(s["params"]["layers"], s["params"]["jit_compile"]) for s in specs[1:5]]
    assert trains == [(2, False), (2, True), (10, False), (10, True)]
    assert specs[0]["params"]["batch_size"] == 16 and specs[0]["params"]["layers"] == 8
    assert json.loads(json.dumps(specs)) == specs  # specs travel to workers as JSON


def test_config_rejects_bad_values():
    with pytest.raises(UserInputError, match="--precisions"):
        harness.BenchmarkConfig(precisions=("float8",)).validate()
    with pytest.raises(UserInputError, match="--warmup must be >= 1"):
        harness.BenchmarkConfig(warmup=0).validate()
    with pytest.raises(UserInputError, match="--search_space 'nas'"):
        harness.BenchmarkConfig(search_space="nas").validate()


def test_timing_figures_throughput_and_latency():
    seconds = {"seconds": [0.5, 0.25, 1.0], "cpu_seconds": [1.0, 0.5, 2.0]}
    throughput = harness.timing_figures(seconds, batch_size=8)
    assert throughput["unit"] == "images/s"
    assert (throughput["median"], throughput["min"], throughput["max"]) == (16.0, 8.0, 32.0)
    assert throughput["cpu_ms_per_call"]["median"] == 1000.0
    latency = harness.timing_figures(seconds, batch_size=1, latency=True)
    assert latency["unit"] == "ms"
    assert (latency["median"], latency["min"], latency["max"]) == (500.0, 250.0, 1000.0)


class _FakeClock:
    """Wall time that advances only when the timed call says so; CPU time twice as fast."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def process_time(self):
        return 2.0 * self.now


def test_time_calls_warms_up_and_loops_fast_calls(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    calls = []

    def call():  # the first call traces: 10 ms; then 2 ms each
        calls.append(1)
        clock.now += 0.010 if len(calls) == 1 else 0.002

    result = timing.time_calls(call, repeats=3, warmup=2, min_repeat_seconds=0.02)
    assert result["first_call_seconds"] == pytest.approx(0.010)
    # Repeats of 0.02 s at the last warm-up call's 2 ms: 10 calls each.
    assert result["calls_per_repeat"] == 10
    assert len(calls) == 2 + 3 * 10
    assert result["seconds"] == pytest.approx([0.002] * 3)
    assert result["cpu_seconds"] == pytest.approx([0.004] * 3)
    single = timing.time_calls(call, repeats=2, warmup=1)
    assert single["calls_per_repeat"] == 1 and len(single["seconds"]) == 2


def _record(what, median, unit, **config):
    return {"what": what, "status": "ok", "median": median, "min": median, "max": median,
            "unit": unit, "config": config}  # fmt: skip


def test_pytorch_reference_matches_only_its_settings():
    base = dict(genotype="PIBCONV", layers=10, init_channels=36, batch_size=32)
    ours = _record("train_step", 23.4, "images/s", precision="float32", **base)
    assert harness.pytorch_reference(ours) == {"value": 7.8, "unit": "images/s", "speedup": 3.0}
    assert harness.pytorch_reference({**ours, "accelerator": "GPU"}) is None
    other = _record("train_step", 23.4, "images/s", precision="float32", **{**base, "layers": 3})
    assert harness.pytorch_reference(other) is None
    tflite = _record("tflite", 2.0, "ms", format="tflite_fp32", **{**base, "batch_size": 1})
    assert harness.pytorch_reference(tflite)["speedup"] == 34.5  # 69 ms / 2 ms


def test_table_lists_every_record_and_the_ratios():
    net = dict(genotype="PIBCONV", layers=2, init_channels=36)
    records = [
        _record("train_step", 100.0, "images/s", batch_size=32, precision="float32", **net),
        _record("pipeline", 5000.0, "images/s", batch_size=32, pipeline="train", source="s"),
        _record("tflite", 4.0, "ms", format="tflite_fp32", threads=1, batch_size=1, **net),
        _record("tflite", 2.0, "ms", format="tflite_int8", threads=1, batch_size=1, **net),
        {"what": "train_step", "status": "skipped", "reason": "needs a GPU", "config": net},
    ]
    records = [harness.finish_record(r) for r in records]
    table = harness.format_table(records)
    assert len(table.splitlines()) == 2 + len(records) + 2 + 2
    assert "outruns train PIBCONV L=2 C=36 float32: 50.0x" in table
    assert "tflite_int8 PIBCONV L=2 C=36 threads=1: 2.00x the speed of fp32" in table
    assert "skipped: needs a GPU" in table


def test_graph_optimizer_is_off_on_a_cpu_unless_asked_for():
    import tensorflow as tf

    from pibconv_tf import distribute

    def disabled():
        return tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer")

    try:
        assert distribute.configure_graph_optimizer("on") is True and disabled() is False
        assert distribute.configure_graph_optimizer("off") is False and disabled() is True
        has_gpu = bool(tf.config.list_physical_devices("GPU"))
        assert distribute.configure_graph_optimizer("auto") is has_gpu
        assert disabled() is not has_gpu
        with pytest.raises(UserInputError, match="graph_optimizer"):
            distribute.configure_graph_optimizer("fast")
    finally:
        distribute.configure_graph_optimizer("auto")


_THREADS_SCRIPT = """
import sys, tensorflow as tf
from pibconv_tf import distribute
from pibconv_tf.errors import UserInputError
mode = sys.argv[1]
if mode == "auto":
    got = distribute.configure_threads()
    small = distribute.cpu_cores() <= distribute.SMALL_CPU_CORES
    small = small and not tf.config.list_physical_devices("GPU")
    assert got == ((1, distribute.cpu_cores()) if small else (0, 0)), got
elif mode == "explicit":
    assert distribute.configure_threads(3, 1) == (3, 1)
elif mode == "tensorflow":
    assert distribute.configure_threads(0, 0) == (0, 0)
threading = tf.config.threading
pools = threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()
assert pools == distribute.configure_threads(*pools or (0, 0)), pools  # same sizes: no error
tf.constant(1.0) + 1.0  # the runtime starts: the pools are fixed from now on
try:
    distribute.configure_threads(pools[0] + 1, 0)
except UserInputError as error:
    assert "already started" in str(error), error
else:
    raise AssertionError("a started pool was resized")
try:
    distribute.configure_threads(-2, 0)
except UserInputError as error:
    assert "intra_op_threads" in str(error), error
else:
    raise AssertionError("-2 was accepted")
print("ok", pools)
"""


@pytest.mark.parametrize("mode", ["auto", "explicit", "tensorflow"])
def test_configure_threads_sets_the_pools_before_the_runtime_starts(mode):
    # A process sets its pools once: each case runs in its own interpreter.
    result = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def test_the_harness_knows_every_export_format_and_implementation():
    # harness.py keeps its own copies (its parent process imports no TensorFlow).
    from pibconv_tf.deploy import tflite

    assert harness.TFLITE_FORMATS == tflite.TFLITE_FORMATS
    assert tuple(harness.TFLITE_IMPLEMENTATIONS) == tuple(tflite.PIB_IMPLEMENTATIONS)


def test_an_app_refuses_a_bad_thread_count_before_writing(tmp_path):
    model_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.train",
            "--genotype=PIBCONV",
            "--intra_op_threads=-2",
            f"--model_dir={model_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 1
    assert "error: --intra_op_threads must be -1 (auto)" in result.stderr
    assert not model_dir.exists()


def test_the_train_step_benchmark_times_steps_of_the_network_it_builds():
    from benchmarks import train_step  # noqa: PLC0415 (TensorFlow)
    from pibconv_tf.model import genotypes, networks  # noqa: PLC0415

    start = time.perf_counter()
    stats = train_step.benchmark_train_step(
        "PIBCONV", layers=1, init_channels=4, batch_size=2, steps=3, warmup=1, image_size=8
    )
    elapsed = time.perf_counter() - start
    assert len(stats["step_seconds"]) == 3
    # The timed steps and the first one happened within the call, by the test's own clock.
    assert stats["first_step_seconds"] + sum(stats["step_seconds"]) < elapsed
    network = networks.network_cifar(genotypes.PIBCONV, 10, 4, 1, auxiliary=True, image_size=8)
    assert stats["params"] == sum(int(np.prod(v.shape)) for v in network.trainable_variables)
    assert (stats["genotype"], stats["layers"], stats["auxiliary"]) == ("PIBCONV", 1, True)
