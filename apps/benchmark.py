"""Speed and memory of search steps, train steps, inference, TFLite and input pipelines.

python -m apps.benchmark --what=all --output=runs/bench/results.jsonl

The figures of the targets table (docs/performance.md), one kind at a time:
python -m apps.benchmark --what=search_step --order=first,second --repeats=3
python -m apps.benchmark --what=train_step --layers=2,10,20 --nojit_compile
python -m apps.benchmark --what=inference,tflite --layers=2,10,20
python -m apps.benchmark --what=pipeline,train_step --layers=2 --nojit_compile

On Keras' JAX backend (search and train steps, compiled by XLA; runs without TensorFlow):
python -m apps.benchmark --backend=jax --what=search_step,train_step

Every measurement runs in its own process (--noisolate: all in this one) and becomes one JSON
line in --output (appended; --overwrite starts the file afresh) with median, min and max over
--repeats, peak resident memory, device, versions and time; a table follows on stdout.
--jit_compile / --nojit_compile and --mixed_precision restrict the train-step variants
(default: with and without XLA, float32 and mixed_float16, the latter skipped on a CPU).
--dataset feeds the pipeline and the TFLite calibration (default: synthetic CIFAR-sized
images). Exit status 1 if a measurement failed.
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)

import json
import os
import sys

from absl import flags

from benchmarks import harness
from pibconv_tf.errors import RunError, UserInputError
from pibconv_tf.model import acceleration

_SHARED = common.define(
    "dataset",
    "data_dir",
    "image_size",
    "seed",
    "overwrite",
    "mixed_precision",
    "jit_compile",
    "backend",
    *common.RUNTIME,
)

_WHAT = flags.DEFINE_list(
    "what", ["all"], f"Measurements: all, or some of {', '.join(harness.WHATS)}."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median, min, max over them).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first; the first one traces.")
_MIN_REPEAT_SECONDS = flags.DEFINE_float(
    "min_repeat_seconds", 0.2, "Inference and TFLite repeats loop a call for this long."
)
_OUTPUT = flags.DEFINE_string("output", None, "JSON-lines file the records are appended to.")
_GENOTYPE = flags.DEFINE_string("genotype", "PIBCONV", "Genotype name or genotype.json path.")
_LAYERS = flags.DEFINE_list("layers", ["2", "10", "20"], "Cells of the derived network.")
_INIT_CHANNELS = flags.DEFINE_integer("init_channels", 36, "C of the derived network.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Train-step and train-pipeline batch.")
_IMPLEMENTATION = flags.DEFINE_enum(
    "implementation",
    "depthwise",
    list(harness.IMPLEMENTATIONS),
    "PIBConv's grouped convolution in the Keras graphs.",
)
_SEARCH_LAYERS = flags.DEFINE_integer("search_layers", 8, "Cells of the search network.")
_SEARCH_INIT_CHANNELS = flags.DEFINE_integer("search_init_channels", 16, "C of the search.")
_SEARCH_BATCH_SIZE = flags.DEFINE_integer("search_batch_size", 16, "Search-step batch.")
_SEARCH_SPACE = flags.DEFINE_enum(
    "search_space", "pibconv", list(harness.SEARCH_SPACES), "Operation set of the search."
)
_SEARCH_NODES = flags.DEFINE_integer("search_nodes", 4, "Intermediate nodes per search cell.")
_SEARCH_PARTIAL_CHANNELS = flags.DEFINE_integer(
    "search_partial_channels", 1, "K of PC-DARTS' partial channels in search_step (1: DARTS)."
)
_SEARCH_INLINE_TRACES = flags.DEFINE_bool(
    "search_inline_traces",
    False,
    "Inline the shared mixed-operation traces into the search step's graph (apps.search's "
    "--inline_traces; the default, False, runs them as function calls).",
)
_SEARCH_RECOMPUTE = flags.DEFINE_bool(
    "search_recompute",
    None,
    "Recompute each mixed operation in the search step's backward pass (apps.search's "
    "--recompute; unset: on with TensorFlow, off on JAX).",
)
_ORDER = flags.DEFINE_list("order", list(harness.ORDERS), "Architecture-gradient orders.")
_INFERENCE_BATCH_SIZES = flags.DEFINE_list(
    "inference_batch_sizes", ["1", "256"], "Batch sizes of Keras and SavedModel inference."
)
_INFERENCE_MODES = flags.DEFINE_list(
    "inference_modes", list(harness.INFERENCE_MODES), "How Keras inference is called."
)
_TFLITE_FORMATS = flags.DEFINE_list(
    "tflite_formats", list(harness.TFLITE_FORMATS), "TFLite artifacts to time (batch 1)."
)
_TFLITE_IMPLEMENTATION = flags.DEFINE_enum(
    "tflite_implementation",
    "split",
    list(harness.TFLITE_IMPLEMENTATIONS),
    "PIBConv's form in the TFLite graphs (split: apps.export's default).",
)
_TFLITE_THREADS = flags.DEFINE_list("tflite_threads", ["1", "2"], "LiteRT thread counts.")
_EVAL_IMAGES = flags.DEFINE_integer(
    "eval_images", 100, "Images on which TFLite top-1 is compared with fp32 (0: skip)."
)
_MODEL = flags.DEFINE_string(
    "model", None, "A trained model.keras for inference and tflite (default: a fresh network)."
)
_PIPELINES = flags.DEFINE_list("pipelines", list(harness.PIPELINES), "Input pipelines.")
_PIPELINE_IMAGES = flags.DEFINE_integer(
    "pipeline_images", 50000, "Images of the synthetic source (without --dataset)."
)
_ISOLATE = flags.DEFINE_bool(
    "isolate", True, "One process per measurement (its own peak memory, no shared state)."
)


def _integers(flag):
    try:
        return tuple(int(value) for value in flag.value)
    except ValueError as error:
        raise UserInputError(
            f"--{flag.name} {','.join(flag.value)!r} must list whole numbers."
        ) from error


def _cpu_kernels():
    if _SHARED.cpu_kernels.value:
        return _SHARED.cpu_kernels.value
    try:
        return acceleration.mode_from_environment()
    except ValueError as error:
        raise UserInputError(str(error)) from error


def config_from_flags():
    backend = _SHARED.backend.value
    everything = harness.JAX_WHATS if backend == "jax" else harness.WHATS
    what = everything if "all" in _WHAT.value else tuple(_WHAT.value)
    jit_modes = (_SHARED.jit_compile.value,) if _SHARED.jit_compile.present else (False, True)
    precisions = ("float32", "mixed_float16")
    if _SHARED.mixed_precision.value:
        precisions = ("float32", _SHARED.mixed_precision.value)
    return harness.BenchmarkConfig(
        what=what,
        repeats=_REPEATS.value,
        warmup=_WARMUP.value,
        min_repeat_seconds=_MIN_REPEAT_SECONDS.value,
        genotype=_GENOTYPE.value,
        layers=_integers(_LAYERS),
        init_channels=_INIT_CHANNELS.value,
        batch_size=_BATCH_SIZE.value,
        image_size=_SHARED.image_size.value,
        implementation=_IMPLEMENTATION.value,
        jit_compile_modes=jit_modes,
        precisions=precisions,
        search_layers=_SEARCH_LAYERS.value,
        search_init_channels=_SEARCH_INIT_CHANNELS.value,
        search_batch_size=_SEARCH_BATCH_SIZE.value,
        search_space=_SEARCH_SPACE.value,
        search_nodes=_SEARCH_NODES.value,
        search_partial_channels=_SEARCH_PARTIAL_CHANNELS.value,
        search_inline_traces=_SEARCH_INLINE_TRACES.value,
        search_recompute=_SEARCH_RECOMPUTE.value,
        order=tuple(_ORDER.value),
        search_jit_compile=_SHARED.jit_compile.value if _SHARED.jit_compile.present else False,
        inference_batch_sizes=_integers(_INFERENCE_BATCH_SIZES),
        inference_modes=tuple(_INFERENCE_MODES.value),
        tflite_formats=tuple(_TFLITE_FORMATS.value),
        tflite_threads=_integers(_TFLITE_THREADS),
        tflite_implementation=_TFLITE_IMPLEMENTATION.value,
        eval_images=_EVAL_IMAGES.value,
        model=_MODEL.value,
        # --dataset defaults to cifar10 for the training apps; here it is opt-in.
        dataset=_SHARED.dataset.value if _SHARED.dataset.present else None,
        data_dir=_SHARED.data_dir.value,
        pipeline_images=_PIPELINE_IMAGES.value,
        pipelines=tuple(_PIPELINES.value),
        isolate=_ISOLATE.value,
        intra_op_threads=_SHARED.intra_op_threads.value,
        inter_op_threads=_SHARED.inter_op_threads.value,
        graph_optimizer=_SHARED.graph_optimizer.value,
        cpu_kernels=_cpu_kernels(),
        seed=_SHARED.seed.value,
        output=_OUTPUT.value,
        backend=backend,
    ).validate()


def _prepare_output(config):
    """Writes config.json beside --output; --overwrite empties the JSON-lines file."""
    if not config.output:
        return
    directory = os.path.dirname(os.path.abspath(config.output))
    os.makedirs(directory, exist_ok=True)
    if _SHARED.overwrite.value and os.path.exists(config.output):
        os.remove(config.output)
    with open(os.path.join(directory, "config.json"), "w") as stream:
        json.dump(config.to_dict(), stream, indent=2)


def _progress(record):
    figure = f"{record['median']:.4g} {record['unit']}" if record["status"] == "ok" else ""
    print(f"[{record['status']}] {record['name']} {figure}", file=sys.stderr, flush=True)


def main(argv):
    del argv
    config = config_from_flags()
    _prepare_output(config)
    records = harness.run_benchmarks(config, on_record=_progress)
    print(harness.format_table(records))
    failed = [r for r in records if r["status"] == "error"]
    if failed:
        raise RunError(
            f"{len(failed)} of {len(records)} measurements failed; the first, "
            f"{failed[0]['name']!r}, with: {failed[0].get('reason')}"
        )


if __name__ == "__main__":
    common.run(main)
