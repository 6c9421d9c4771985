"""One harness for the speed and memory of search, training, inference, TFLite and input.

`run_benchmarks(config)` expands a `BenchmarkConfig` into measurements, runs each in a fresh
Python process (so that its peak resident memory is its own and no TensorFlow state leaks
from one to the next), and returns one record per measurement; `write_jsonl` and
`format_table` turn them into JSON lines and a readable table. TFLite models are timed in a
process that imports only LiteRT and numpy, as on the edge device.

Example:
```python
config = BenchmarkConfig(what=("train_step",), layers=(2,), repeats=5).validate()
records = run_benchmarks(config)
print(format_table(records))
```

This module imports neither TensorFlow nor Keras: the measurements live in
`benchmarks.measures`, loaded by the worker processes.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from pibconv_tf.deploy.latency import time_tflite
from pibconv_tf.errors import UserInputError

WHATS = ("search_step", "train_step", "inference", "tflite", "pipeline")
BACKENDS = ("tensorflow", "jax")
JAX_WHATS = ("search_step", "train_step")  # benchmarks.jax_steps; the rest is TensorFlow's
ORDERS = ("first", "second")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
INFERENCE_MODES = ("keras_call", "predict_on_batch", "saved_model")
TFLITE_FORMATS = (
    "tflite_fp32",
    "tflite_fp16",
    "tflite_dynamic_int8",
    "tflite_int8",
    "tflite_int8_mixed",
)
PIPELINES = ("train", "search")
IMPLEMENTATIONS = ("depthwise", "grouped")
TFLITE_IMPLEMENTATIONS = ("split", *IMPLEMENTATIONS)  # export_tflite.PIB_IMPLEMENTATIONS
TFLITE_EXTRAS = ("bytes", "convert_seconds", "top1_agreement_with_fp32", "accuracy", "eval_images")
GRAPH_OPTIMIZER_MODES = ("auto", "on", "off")  # distribute.GRAPH_OPTIMIZER_MODES
CPU_KERNEL_MODES = ("auto", "on", "off")  # model.acceleration.MODES
SEARCH_SPACES = ("darts", "darts_gelu", "darts_gelu_ln", "convnext", "pibconv")

# The authors' PyTorch code on this CPU class (2 cores, AVX-512), from the project brief:
# (what, settings that must match, value, unit).
PYTORCH_REFERENCE = (
    ("search_step", {"order": "first", "batch_size": 16, "layers": 8, "init_channels": 16,
                     "search_space": "pibconv"}, 0.87, "images/s"),
    ("search_step", {"order": "second", "batch_size": 16, "layers": 8, "init_channels": 16,
                     "search_space": "pibconv"}, 0.36, "images/s"),
    ("train_step", {"genotype": "PIBCONV", "layers": 20, "init_channels": 36,
                    "batch_size": 32}, 3.9, "images/s"),
    ("train_step", {"genotype": "PIBCONV", "layers": 10, "init_channels": 36,
                    "batch_size": 32}, 7.8, "images/s"),
    ("train_step", {"genotype": "PIBCONV", "layers": 2, "init_channels": 36,
                    "batch_size": 32}, 74.0, "images/s"),
    *(
        (what, {"genotype": "PIBCONV", "layers": layers, "init_channels": 36,
                "batch_size": 1}, ms, "ms")
        for what in ("inference", "tflite")
        for layers, ms in ((2, 8.5), (10, 69.0), (20, 134.0))
    ),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """What `run_benchmarks` measures; the fields mirror `apps.benchmark`'s flags.

    Attributes:
        what: subset of `WHATS`.
        repeats: timed repeats per measurement (median, min and max are over these).
        warmup: untimed calls first (at least 1; the first traces and compiles).
        min_repeat_seconds: a repeat of a fast call (inference, TFLite) runs it as many times
            as fit in this many seconds and reports the time per call (0: one call).
        genotype: derived network of train_step, inference and tflite (name or JSON path).
        layers: cell counts of the derived network, one measurement each.
        init_channels, batch_size: C and the training batch of the derived network.
        image_size, num_classes: input and classifier sizes.
        implementation: PIBConv's grouped convolution, "depthwise" or "grouped".
        jit_compile_modes: train_step with and/or without XLA.
        precisions: train_step dtype policies; mixed ones are skipped on a CPU.
        search_layers, search_init_channels, search_batch_size, search_space, search_nodes,
            order: the search network (nodes per cell) and the architecture-gradient orders
            of search_step.
        search_partial_channels: K of PC-DARTS' partial channels in search_step (1: DARTS).
        search_inline_traces: inline the shared traces into the search step's graph.
        search_recompute: recompute the mixed operations in the search step's backward
            (None: wherever offered, as apps.search).
        search_jit_compile: compile the search step with XLA.
        inference_batch_sizes, inference_modes: Keras / SavedModel inference.
        tflite_formats, tflite_threads: TFLite artifacts (batch 1) and LiteRT thread counts.
        tflite_implementation: PIBConv's form in the TFLite graphs ("split", the export's
            default, "depthwise" or "grouped").
        eval_images: images on which each TFLite artifact's top-1 is compared with fp32's.
        model: a trained `model.keras` for inference and tflite instead of a fresh network.
        dataset, data_dir: the pipeline's source and TFLite's calibration images (None: a
            synthetic in-memory CIFAR-sized source of `pipeline_images` images).
        pipeline_images: size of the synthetic source.
        pipelines: "train" (`data.train_pipeline`) and/or "search" (`data.search_pipeline`).
        isolate: run every measurement in its own process (per-measurement peak memory).
        intra_op_threads, inter_op_threads: TensorFlow thread pools in the measuring
            processes (-1: auto, `distribute.configure_threads`; 0: TensorFlow's choice).
        graph_optimizer: TensorFlow's graph optimiser, "auto" (on with a GPU, off on a CPU),
            "on" or "off" (`distribute.configure_graph_optimizer`).
        cpu_kernels: TensorFlow's CPU training kernels (`pibconv_tf.kernels`), "auto",
            "on" or "off" (`model.acceleration`).
        seed: initialisation and data seed.
        output: JSON-lines file the records are appended to (None: none).
        backend: Keras backend of the measuring processes; "jax" measures search_step and
            train_step (`benchmarks.jax_steps`, always compiled by XLA, no TensorFlow).
    """

    what: tuple[str, ...] = WHATS
    repeats: int = 5
    warmup: int = 2
    min_repeat_seconds: float = 0.2
    genotype: str = "PIBCONV"
    layers: tuple[int, ...] = (2, 10, 20)
    init_channels: int = 36
    batch_size: int = 32
    image_size: int = 32
    num_classes: int = 10
    implementation: str = "depthwise"
    jit_compile_modes: tuple[bool, ...] = (False, True)
    precisions: tuple[str, ...] = ("float32", "mixed_float16")
    search_layers: int = 8
    search_init_channels: int = 16
    search_batch_size: int = 16
    search_space: str = "pibconv"
    search_nodes: int = 4
    search_partial_channels: int = 1
    search_inline_traces: bool = False
    search_recompute: bool | None = None
    order: tuple[str, ...] = ORDERS
    search_jit_compile: bool = False
    inference_batch_sizes: tuple[int, ...] = (1, 256)
    inference_modes: tuple[str, ...] = INFERENCE_MODES
    tflite_formats: tuple[str, ...] = TFLITE_FORMATS
    tflite_threads: tuple[int, ...] = (1, 2)
    tflite_implementation: str = "split"
    eval_images: int = 100
    model: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    pipeline_images: int = 50000
    pipelines: tuple[str, ...] = PIPELINES
    isolate: bool = True
    intra_op_threads: int = -1
    inter_op_threads: int = -1
    graph_optimizer: str = "auto"
    cpu_kernels: str = "auto"
    seed: int = 0
    output: str | None = None
    backend: str = "tensorflow"

    def validate(self):
        """Raises UserInputError naming the first bad field; returns self."""
        choices = (
            ("what", WHATS),
            ("order", ORDERS),
            ("precisions", PRECISIONS),
            ("inference_modes", INFERENCE_MODES),
            ("tflite_formats", TFLITE_FORMATS),
            ("pipelines", PIPELINES),
        )
        for name, accepted in choices:
            values = getattr(self, name)
            bad = [v for v in values if v not in accepted]
            if bad or not values:
                raise UserInputError(
                    f"--{name} {','.join(map(str, values))!r} holds unknown or no values "
                    f"{bad}; accepted are {', '.join(accepted)}."
                )
        for name, accepted in (
            ("implementation", IMPLEMENTATIONS),
            ("tflite_implementation", TFLITE_IMPLEMENTATIONS),
            ("search_space", SEARCH_SPACES),
            ("graph_optimizer", GRAPH_OPTIMIZER_MODES),
            ("cpu_kernels", CPU_KERNEL_MODES),
            ("backend", BACKENDS),
        ):
            if getattr(self, name) not in accepted:
                raise UserInputError(
                    f"--{name} {getattr(self, name)!r} is unknown; accepted are "
                    f"{', '.join(accepted)}."
                )
        minimums = (
            ("repeats", 1), ("warmup", 1), ("init_channels", 1), ("batch_size", 1),
            ("image_size", 8), ("num_classes", 2), ("search_layers", 1),
            ("search_init_channels", 1), ("search_batch_size", 1), ("search_nodes", 1),
            ("eval_images", 0), ("pipeline_images", 2), ("intra_op_threads", -1),
            ("inter_op_threads", -1),
        )  # fmt: skip
        for name, minimum in minimums:
            if getattr(self, name) < minimum:
                raise UserInputError(f"--{name} must be >= {minimum}, got {getattr(self, name)}.")
        for name in ("layers", "inference_batch_sizes", "tflite_threads"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise UserInputError(
                    f"--{name} must list integers >= 1, got {','.join(map(str, values))!r}."
                )
        if self.min_repeat_seconds < 0:
            raise UserInputError(
                f"--min_repeat_seconds must be >= 0, got {self.min_repeat_seconds}."
            )
        if self.backend == "jax" and set(self.what) - set(JAX_WHATS):
            others = ",".join(w for w in self.what if w not in JAX_WHATS)
            raise UserInputError(
                f"--what={others} runs on TensorFlow; --backend=jax measures "
                f"{' and '.join(JAX_WHATS)} (pass --what={','.join(JAX_WHATS)})."
            )
        if not self.isolate and self.backend != _process_backend():
            raise UserInputError(
                f"--backend={self.backend} with --noisolate needs this process on that "
                f"backend, but Keras here runs on {_process_backend()}; drop --noisolate."
            )
        if self.model is not None and not pathlib.Path(self.model).is_file():
            raise UserInputError(f"--model {self.model!r} does not exist; pass a model.keras.")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


def _process_backend():
    import keras  # noqa: PLC0415 (only when asked: the harness' import stays light)

    return keras.backend.backend()


def measurement_specs(config):
    """The measurements of `config`, in order, as JSON-able dicts {"what", "params"}."""
    specs = []
    # XLA compiles every JAX step: one train_step per network, recorded as jit_compiled.
    jit_modes = (True,) if config.backend == "jax" else config.jit_compile_modes
    common = {"repeats": config.repeats, "warmup": config.warmup, "seed": config.seed}
    net = {
        "genotype": config.genotype,
        "init_channels": config.init_channels,
        "image_size": config.image_size,
        "num_classes": config.num_classes,
        "implementation": config.implementation,
    }
    for what in WHATS:
        if what not in config.what:
            continue
        if what == "search_step":
            specs += [_spec(what, common, order=order, **_search_params(config)) for order in
                      config.order]  # fmt: skip
        elif what == "train_step":
            specs += [
                _spec(
                    what,
                    common,
                    **net,
                    layers=layers,
                    batch_size=config.batch_size,
                    precision=precision,
                    jit_compile=jit,
                )  # fmt: skip
                for layers in config.layers
                for precision in config.precisions
                for jit in jit_modes
            ]
        elif what in ("inference", "tflite"):
            extra = _inference_params(config) if what == "inference" else _tflite_params(config)
            for layers in [None] if config.model else config.layers:
                specs.append(_spec(what, common, **net, layers=layers, model=config.model,
                                   **extra))  # fmt: skip
        else:
            specs += [_spec(what, common, **_pipeline_params(config), pipeline=pipeline)
                      for pipeline in config.pipelines]  # fmt: skip
    return specs


def _spec(what, common, **params):
    return {"what": what, "params": {**common, **params}}


def _search_params(config):
    return {
        "batch_size": config.search_batch_size,
        "layers": config.search_layers,
        "init_channels": config.search_init_channels,
        "search_space": config.search_space,
        "nodes": config.search_nodes,
        "partial_channels": config.search_partial_channels,
        "inline_traces": config.search_inline_traces,
        "recompute": config.search_recompute,
        "image_size": config.image_size,
        "implementation": config.implementation,
        "jit_compile": config.search_jit_compile or config.backend == "jax",
    }


def _inference_params(config):
    return {
        "batch_sizes": list(config.inference_batch_sizes),
        "modes": list(config.inference_modes),
        "min_repeat_seconds": config.min_repeat_seconds,
    }


def _tflite_params(config):
    return {
        "formats": list(config.tflite_formats),
        "tflite_implementation": config.tflite_implementation,
        "threads": list(config.tflite_threads),
        "eval_images": config.eval_images,
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "min_repeat_seconds": config.min_repeat_seconds,
    }


def _pipeline_params(config):
    return {
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "image_size": config.image_size,
        "num_classes": config.num_classes,
        "pipeline_images": config.pipeline_images,
        "batch_size": config.batch_size,
        "search_batch_size": config.search_batch_size,
    }


def run_benchmarks(config, on_record=None):
    """Runs every measurement of `config` and returns the records, in order.

    Args:
        config: a validated `BenchmarkConfig`.
        on_record: called with each record as soon as it exists (e.g. to print progress).

    Returns:
        A list of records (dicts); `docs/performance.md` lists the keys.
    """
    records = []

    def emit(record):
        record = finish_record(record)
        records.append(record)
        if config.output:
            append_jsonl(config.output, record)
        if on_record is not None:
            on_record(record)

    threads = {"intra_op": config.intra_op_threads, "inter_op": config.inter_op_threads}
    runtime = {
        "backend": config.backend,
        "threads": threads,
        "graph_optimizer": config.graph_optimizer,
        "cpu_kernels": config.cpu_kernels,
    }
    with tempfile.TemporaryDirectory(prefix="pibconv_benchmark_") as workdir:
        for index, spec in enumerate(measurement_specs(config)):
            spec = {**spec, "workdir": os.path.join(workdir, str(index)), **runtime}
            os.makedirs(spec["workdir"])
            for record in _run_spec(spec, config.isolate):
                timings = record.pop("timings", None)
                if timings is None:
                    emit(record)
                    continue
                for timing in timings:  # TFLite: converted in one process, timed in others
                    for result in _run_spec({**timing, **runtime}, config.isolate):
                        emit(result)
    return records


def _run_spec(spec, isolate):
    """Records of one measurement, from a worker process or (not isolated) in-process."""
    if not isolate:
        return list(run_measurement(spec, scope="process"))
    name = f"{spec['what']}_{spec['params'].get('format', '')}_{spec['params'].get('threads', '')}"
    spec_path = os.path.join(spec["workdir"], f"{name}.spec.json")
    out_path = os.path.join(spec["workdir"], f"{name}.records.json")
    pathlib.Path(spec_path).write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KERAS_BACKEND"] = spec.get("backend", "tensorflow")
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.harness", spec_path, out_path]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not os.path.exists(out_path):
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"worker exited with status {result.returncode}"
        return [_error_record(spec, reason)]
    return json.loads(pathlib.Path(out_path).read_text())


def _error_record(spec, reason):
    what = "tflite" if spec["what"] == "tflite_timing" else spec["what"]
    return {"what": what, "config": spec["params"], "status": "error", "reason": reason}


def run_measurement(spec, scope="measurement"):
    """Runs one spec in this process and yields its records (the worker's side).

    A TFLite timing imports only LiteRT and numpy; everything else loads TensorFlow.
    """
    threads = spec.get("threads") or {}
    backend = spec.get("backend", "tensorflow")
    try:
        if spec["what"] == "tflite_timing":
            records = [_tflite_timing(spec["params"])]
        elif backend == "jax":
            from benchmarks import jax_steps  # noqa: PLC0415 (keras, jax, numpy only)

            records = jax_steps.MEASURES[spec["what"]](spec)
            threads = {}
        else:
            from benchmarks import measures  # noqa: PLC0415 (TensorFlow)
            from pibconv_tf import distribute  # noqa: PLC0415
            from pibconv_tf.model import acceleration  # noqa: PLC0415

            acceleration.set_mode(spec.get("cpu_kernels", "auto"))
            intra, inter = distribute.configure_threads(
                threads.get("intra_op", -1), threads.get("inter_op", -1)
            )
            threads = {"intra_op": intra, "inter_op": inter}
            graph_optimizer = distribute.configure_graph_optimizer(
                spec.get("graph_optimizer", "auto")
            )
            records = measures.MEASURES[spec["what"]](spec)
            for record in records:
                record.setdefault("backend", "tensorflow")
                record.setdefault("graph_optimizer", graph_optimizer)
                record.setdefault("cpu_kernels", acceleration.enabled())
    except UserInputError:
        raise
    except Exception as error:  # noqa: BLE001 (one failed measurement must not stop the rest)
        records = [_error_record(spec, f"{type(error).__name__}: {error}")]
    for record in records:
        record.setdefault("peak_rss_mb", peak_rss_mb())
        record.setdefault("peak_rss_scope", scope)
        record.setdefault("threads", threads)
        yield record


def _tflite_timing(params):
    timing = time_tflite(
        params["path"],
        params["threads"],
        params["repeats"],
        params["warmup"],
        params["min_repeat_seconds"],
        params["seed"],
    )
    config = {k: v for k, v in params.items() if k != "path"}
    extra = {k: params[k] for k in TFLITE_EXTRAS if k in params}
    return {
        "what": "tflite",
        "config": config,
        **timing_figures(timing, timing["batch_size"], latency=True),
        "input_dtype": timing["input_dtype"],
        "device": cpu_name(),
        **extra,
    }


def peak_rss_mb():
    """This process' peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def finish_record(record):
    """Adds the common keys (name, versions, time, load, reference) to a measurement record."""
    record = {
        "what": record["what"],
        "name": record.get("name") or describe(record),
        "status": record.get("status", "ok"),
        **record,
    }
    record.setdefault("versions", versions())
    if not record.get("device"):
        record["device"] = cpu_name()
    record["timestamp"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record["load_average"] = [round(x, 2) for x in os.getloadavg()]
    record["cpu_count"] = os.cpu_count()
    reference = pytorch_reference(record)
    if reference is not None:
        record["pytorch_reference"] = reference
    return record


def describe(record):
    """A one-line name of a record's measurement, e.g. "train_step PIBCONV L=2 float32"."""
    c = record.get("config", {})
    what = record["what"]
    on = " [jax]" if record.get("backend") == "jax" else ""
    if what == "search_step":
        return (
            f"search {c.get('order')} order {c.get('search_space')} L={c.get('layers')} "
            f"C={c.get('init_channels')}{on}"
        )
    net = f"{c.get('genotype')} L={c.get('layers')} C={c.get('init_channels')}"
    if what == "train_step":
        xla = " xla" if c.get("jit_compile") else ""
        return f"train {net} {c.get('precision')}{xla}{on}"
    if what == "inference":
        return f"{c.get('mode')} {net}"
    if what == "tflite":
        return f"{c.get('format')} {net} threads={c.get('threads')}"
    if what == "pipeline":
        return f"{c.get('pipeline')} pipeline {c.get('source')}"
    return what


def versions():
    """Python and the installed versions of the packages measured (no import needed)."""
    found = {"python": platform.python_version()}
    for package in ("tensorflow", "keras", "jax", "jaxlib", "numpy", "ai-edge-litert"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def cpu_name():
    """The CPU model (Linux /proc/cpuinfo), for records of processes without TensorFlow."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def pytorch_reference(record):
    """The PyTorch reference figure a CPU record compares with, and our speed-up, or None."""
    if record.get("status") != "ok" or record.get("accelerator", "CPU") != "CPU":
        return None
    config = record.get("config", {})
    for what, settings, value, unit in PYTORCH_REFERENCE:
        if what != record["what"] or any(config.get(k) != v for k, v in settings.items()):
            continue
        if what == "train_step" and (config.get("precision") != "float32"):
            return None
        if what == "tflite" and config.get("format") != "tflite_fp32":
            return None
        ours = record["median"]
        speedup = ours / value if unit == "images/s" else value / ours
        return {"value": value, "unit": unit, "speedup": round(speedup, 3)}
    return None


def timing_figures(timing, batch_size=None, latency=False):
    """The figures of a `timing.time_calls` result: median, min and max, and their unit.

    Throughput records (latency=False) have images/s as primary figures (min is the slowest
    repeat); latency records have ms per call. Both carry `ms_per_call`,
    `images_per_second` and `cpu_ms_per_call` (process CPU time over all threads, which
    stays meaningful on a loaded machine: compare it with ms_per_call to see the cores used).
    """
    seconds = timing["seconds"]
    ms = stats([1e3 * v for v in seconds])
    per_second = stats([batch_size / v for v in seconds]) if batch_size else None
    cpu = timing.get("cpu_seconds")
    primary, unit = (ms, "ms") if latency or not per_second else (per_second, "images/s")
    return {
        "status": "ok",
        "unit": unit,
        **primary,
        "ms_per_call": ms,
        "images_per_second": per_second,
        "cpu_ms_per_call": stats([1e3 * v for v in cpu]) if cpu else None,
        "repeat_seconds": [round(v, 6) for v in seconds],
        "calls_per_repeat": timing.get("calls_per_repeat", 1),
        "first_call_seconds": timing.get("first_call_seconds"),
    }


def stats(values):
    """{"median", "min", "max"} of `values`."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_jsonl(path, records):
    """Appends `records` to the JSON-lines file `path`."""
    for record in records:
        append_jsonl(path, record)


def append_jsonl(path, record):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "a") as stream:
        stream.write(json.dumps(record, sort_keys=False) + "\n")


def format_table(records):
    """The records as a text table, then the ratios the targets are about."""
    header = (
        f"{'measurement':<52}{'batch':>6}{'median':>11}{'min':>10}{'max':>10}  {'unit':<9}"
        f"{'peak MB':>8}  {'vs PyTorch':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        name = r["name"][:51]
        batch = r.get("config", {}).get("batch_size", "")
        if r["status"] != "ok":
            lines.append(f"{name:<52}{batch!s:>6}  {r['status']}: {r.get('reason', '')}")
            continue
        reference = r.get("pytorch_reference")
        ratio = f"{reference['speedup']:.2f}x" if reference else ""
        lines.append(
            f"{name:<52}{batch!s:>6}{_num(r['median']):>11}{_num(r['min']):>10}"
            f"{_num(r['max']):>10}  {r['unit']:<9}{r.get('peak_rss_mb', 0):8.0f}  {ratio:>10}"
        )
    ratios = ratio_lines(records)
    if ratios:
        lines += ["", "ratios:"] + [f"  {line}" for line in ratios]
    return "\n".join(lines)


def _num(value):
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"


def ratio_lines(records):
    """Pipeline vs step throughput, int8 vs fp32 and TFLite vs Keras at batch 1."""
    ok = [r for r in records if r["status"] == "ok"]
    lines = []
    for r in (r for r in ok if r["what"] == "pipeline"):
        stepping = "train_step" if r["config"]["pipeline"] == "train" else "search_step"
        batch = r["config"]["batch_size"]
        steps = [s for s in ok if s["what"] == stepping and s["config"]["batch_size"] == batch]
        for step in steps:
            factor = r["median"] / step["median"]
            verdict = "outruns" if factor > 1 else "is SLOWER than"
            lines.append(f"{r['name']} {verdict} {step['name']}: {factor:.1f}x")
    tflite = [r for r in ok if r["what"] == "tflite"]
    for r in tflite:
        if r["config"]["format"] == "tflite_fp32":
            continue
        base = _match(tflite, r, format="tflite_fp32")
        if base:
            agreement = r.get("top1_agreement_with_fp32")
            note = f", top-1 agreement {agreement:.1%}" if agreement is not None else ""
            lines.append(
                f"{r['name']}: {base['median'] / r['median']:.2f}x the speed of fp32{note}"
            )
    for r in (r for r in tflite if r["config"]["format"] == "tflite_fp32"):
        keras_b1 = [
            k
            for k in ok
            if k["what"] == "inference"
            and k["config"]["mode"] == "keras_call"
            and k["config"]["batch_size"] == 1
            and k["config"]["layers"] == r["config"]["layers"]
        ]
        for k in keras_b1:
            lines.append(f"{r['name']}: {k['median'] / r['median']:.2f}x the speed of {k['name']}")
    return lines


def _match(records, record, **changes):
    want = {**record["config"], **changes}
    keys = ("format", "threads", "layers", "genotype", "init_channels")
    for r in records:
        if all(r["config"].get(k) == want.get(k) for k in keys):
            return r
    return None


def _worker_main(argv):
    spec_path, out_path = argv[1], argv[2]
    spec = json.loads(pathlib.Path(spec_path).read_text())
    start = time.perf_counter()
    records = list(run_measurement(spec))
    for record in records:
        record.setdefault("process_seconds", round(time.perf_counter() - start, 3))
    pathlib.Path(out_path).write_text(json.dumps(records))


if __name__ == "__main__":
    _worker_main(sys.argv)
