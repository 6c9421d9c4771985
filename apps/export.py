"""Exports a trained model.keras as a SavedModel and TFLite models, with a parity report.

python -m apps.export --model=runs/pibconv_l20/model.keras --output_dir=runs/pibconv_l20/export \
    --dataset=cifar10

Offline, on a model trained on the embedded digits:
python -m apps.export --model=runs/digits_l2/model.keras --output_dir=runs/digits_l2/export \
    --dataset=digits --benchmark_runs=100

The exported models take raw RGB pixels (0..255) and normalise inside with the statistics of
`dataset.json` next to the model (or --mean/--std, or the --dataset's). --dataset supplies the
calibration images of the int8 formats (train split) and the parity images (test split); without
it, parity runs on random pixels and the int8 formats cannot be built (the default --formats then
leave them out). Outputs are listed in pibconv_tf/deploy/export.py and docs/export.md, among them
device_report.json/.md (operators with XNNPACK and TFLite Micro status, arena estimate, size,
latency at --device_report_threads). Float32 artifacts that differ from Keras fail the export
(exit 1).
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)

from absl import flags, logging

from pibconv_tf.deploy import device_report, export
from pibconv_tf.deploy import tflite
from pibconv_tf.errors import UserInputError

_SHARED = common.define("dataset", "data_dir", "image_size", "seed", "overwrite", *common.RUNTIME)

FLAGS = flags.FLAGS
_MODEL = flags.DEFINE_string("model", None, "The logits-only model.keras written by training.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory receiving the artifacts.")
_FORMATS = flags.DEFINE_list(
    "formats",
    list(export.DEFAULT_FORMATS),
    f"Artifacts to write, of {', '.join(export.FORMATS)}; tflite_int8_c writes the int8 model "
    "as C source for TensorFlow Lite Micro (model_data.cc/.h, with the operators its op "
    "resolver needs).",
)
_MEAN = flags.DEFINE_list("mean", None, "Per-channel mean, 0..1 scale (overrides dataset.json).")
_STD = flags.DEFINE_list("std", None, "Per-channel std, 0..1 scale (overrides dataset.json).")
_CLASS_NAMES = flags.DEFINE_list("class_names", None, "Class names (overrides dataset.json).")
_CALIBRATION_IMAGES = flags.DEFINE_integer(
    "calibration_images", 300, "Train images calibrating the int8 models."
)
_PARITY_IMAGES = flags.DEFINE_integer("parity_images", 200, "Test images of the parity report.")
_INT8_IO = flags.DEFINE_bool(
    "int8_io",
    True,
    "Integer input and output for tflite_int8 and tflite_int8_mixed (else float32 in and out).",
)
_INT8_IO_TYPE = flags.DEFINE_enum(
    "int8_io_type", "uint8", list(tflite.INT8_IO_TYPES), "Integer type of --int8_io."
)
_PIB_IMPLEMENTATION = flags.DEFINE_enum(
    "pib_implementation",
    export.DEFAULT_PIB_IMPLEMENTATION,
    list(tflite.PIB_IMPLEMENTATIONS),
    "How the TFLite graph computes PIBConv's grouped convolution (same numbers; split, a "
    "depthwise convolution and a sum of channel halves, runs fastest).",
)
_TFLITE_BATCH_SIZE = flags.DEFINE_integer("tflite_batch_size", 1, "Fixed TFLite batch size.")
_FP32_TOLERANCE = flags.DEFINE_float(
    "fp32_tolerance", 1e-4, "Max |logit difference| of float32 artifacts against Keras."
)
_BENCHMARK_RUNS = flags.DEFINE_integer(
    "benchmark_runs", 0, "Time each TFLite model and Keras over this many runs (0: skip)."
)
_BENCHMARK_WARMUP = flags.DEFINE_integer("benchmark_warmup", 10, "Untimed runs first.")
_BENCHMARK_THREADS = flags.DEFINE_list("benchmark_threads", ["1", "2"], "LiteRT thread counts.")
_BENCHMARK_ROUNDS = flags.DEFINE_integer(
    "benchmark_rounds", 1, "Time all models in turn this often; keep each one's fastest round."
)
_DEVICE_REPORT_RUNS = flags.DEFINE_integer(
    "device_report_runs",
    50,
    "Timed LiteRT runs per thread count in device_report.json/.md (0: the report without latency).",
)
_DEVICE_REPORT_THREADS = flags.DEFINE_list(
    "device_report_threads", ["1", "2", "4"], "LiteRT thread counts of the device report."
)


def _floats(flag, values):
    if values is None:
        return None
    try:
        return tuple(float(v) for v in values)
    except ValueError as error:
        raise UserInputError(f"--{flag} must be numbers, got {','.join(values)}.") from error


def _threads(flag, values):
    try:
        threads = tuple(int(v) for v in values)
    except ValueError as error:
        raise UserInputError(f"--{flag} must be whole numbers, got {','.join(values)}.") from error
    if not threads or min(threads) < 1:
        raise UserInputError(f"--{flag} must be >= 1, got {','.join(values)}.")
    return threads


def config_from_flags():
    if not _MODEL.value or not _OUTPUT_DIR.value:
        raise UserInputError("--model and --output_dir are required.")
    # --dataset defaults to cifar10 for the training apps; here it is opt-in.
    dataset = _SHARED.dataset.value if _SHARED.dataset.present else None
    formats = tuple(_FORMATS.value)
    if not _FORMATS.present and dataset is None:
        formats = tuple(f for f in formats if f not in export.CALIBRATED)
        logging.warning("No --dataset to calibrate with: the int8 formats are left out.")
    return export.ExportConfig(
        model=_MODEL.value,
        output_dir=_OUTPUT_DIR.value,
        formats=formats,
        dataset=dataset,
        data_dir=_SHARED.data_dir.value,
        seed=_SHARED.seed.value,
        image_size=_SHARED.image_size.value if _SHARED.image_size.present else None,
        mean=_floats("mean", _MEAN.value),
        std=_floats("std", _STD.value),
        class_names=tuple(_CLASS_NAMES.value) if _CLASS_NAMES.value else None,
        calibration_images=_CALIBRATION_IMAGES.value,
        parity_images=_PARITY_IMAGES.value,
        int8_io=_INT8_IO.value,
        int8_io_type=_INT8_IO_TYPE.value,
        pib_implementation=_PIB_IMPLEMENTATION.value,
        tflite_batch_size=_TFLITE_BATCH_SIZE.value,
        fp32_tolerance=_FP32_TOLERANCE.value,
        benchmark_runs=_BENCHMARK_RUNS.value,
        benchmark_warmup=_BENCHMARK_WARMUP.value,
        benchmark_threads=_threads("benchmark_threads", _BENCHMARK_THREADS.value),
        benchmark_rounds=_BENCHMARK_ROUNDS.value,
        device_report_runs=_DEVICE_REPORT_RUNS.value,
        device_report_threads=_threads("device_report_threads", _DEVICE_REPORT_THREADS.value),
        overwrite=_SHARED.overwrite.value,
    )


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's SavedModel writer logs at INFO
    config = config_from_flags()
    report = export.export_model(config)
    print(tflite.format_parity(report))
    if report.get("device_report", {}).get("models"):
        print(device_report.format_summary(report["device_report"]))
    if "latency" in report:
        print(tflite.format_latency(report["latency"]))
    print(f"Exported {', '.join(config.formats)} to {config.output_dir}")


if __name__ == "__main__":
    common.run(main)
