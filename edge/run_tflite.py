"""Classify images or benchmark latency with an exported pibconv_tf TFLite model.

Runs on the edge device with numpy, Pillow and LiteRT only (no TensorFlow):

    python run_tflite.py --model=model.tflite --labels=labels.txt --top_k=3 cat.jpg dog.png
    python run_tflite.py --model=model.tflite --benchmark --runs=200 --threads=1,2,4

The model takes raw pixels [1, H, W, 3] (float32 0..255, uint8, or int8 quantized; the
normalisation is inside the model) and returns logits [1, num_classes] (float32 or
quantized). Used as a library (`import run_tflite`): `load_interpreter`, `load_images`,
`classify`, `benchmark`.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image, ImageOps

_TFLITE_IDENTIFIER = b"TFL3"
# (key, header, width, format) of the latency table: the columns of the latency table in
# the export's device_report.md (pibconv_tf/deploy/device_report.py, not imported: the
# runner ships alone; tests/test_edge_runner.py checks that the headers agree).
LATENCY_COLUMNS = (
    ("threads", "threads", 8, "d"),
    ("median_ms", "median ms", 11, ".3f"),
    ("p90_ms", "p90 ms", 9, ".3f"),
    ("mean_ms", "mean ms", 9, ".3f"),
    ("min_ms", "min ms", 9, ".3f"),
    ("cpu_ms", "CPU ms", 9, ".3f"),
    ("runs", "runs", 6, "d"),
)


class RunnerError(Exception):
    """Bad input to the runner; its message is one sentence meant for the user."""


class EdgeInterpreter(Interpreter):
    """A LiteRT `Interpreter` that remembers the thread count it was created with.

    Args:
        model_path: path of the `.tflite` file.
        num_threads: CPU threads LiteRT may use.
    """

    def __init__(self, model_path, num_threads):
        super().__init__(model_path=model_path, num_threads=num_threads)
        self.model_path = model_path
        self.num_threads = num_threads


def default_threads():
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_model_file(path):
    """Raises `RunnerError` unless `path` is a readable file that starts like a TFLite model."""
    if os.path.isdir(path):
        raise RunnerError(f"Model {path!r} is a directory; pass the .tflite file in it.")
    if not os.path.isfile(path):
        raise RunnerError(f"Model file {path!r} does not exist.")
    try:
        with open(path, "rb") as f:
            header = f.read(8)
    except OSError as e:
        raise RunnerError(f"Model file {path!r} could not be read: {e.strerror}.") from e
    # Every TFLite flatbuffer carries the file identifier "TFL3" at bytes 4..8.
    if header[4:8] != _TFLITE_IDENTIFIER:
        raise RunnerError(f"Model file {path!r} is not a TFLite model (no TFL3 identifier).")


def load_interpreter(path, threads=None):
    """Loads a TFLite model into an `EdgeInterpreter` with tensors allocated.

    `threads` defaults to the CPU cores available. Raises `RunnerError` if `path` is not a
    TFLite image classifier that LiteRT can load.
    """
    threads = default_threads() if threads is None else threads
    if not isinstance(threads, int) or threads < 1:
        raise RunnerError(f"--threads must be a positive integer, got {threads!r}.")
    check_model_file(path)
    try:
        interpreter = EdgeInterpreter(path, threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise RunnerError(f"LiteRT could not load model {path!r}: {str(e).rstrip('.')}.") from e
    _check_signature(interpreter, path)
    return interpreter


def _check_signature(interpreter, path):
    inputs = interpreter.get_input_details()
    if len(inputs) != 1 or len(inputs[0]["shape"]) != 4 or inputs[0]["shape"][3] != 3:
        got = [list(d["shape"]) for d in inputs]
        raise RunnerError(f"Model {path!r} must take one [N, H, W, 3] image input, got {got}.")
    logits = _logits_details(interpreter)
    if len(logits["shape"]) != 2:
        raise RunnerError(
            f"Model {path!r} must output logits [N, classes], got {list(logits['shape'])}."
        )


def _logits_details(interpreter):
    """Details of the logits output: named `logits` if present, else the only output."""
    outputs = interpreter.get_output_details()
    names = {d["name"]: d["index"] for d in outputs}
    if len(interpreter.get_signature_list()) == 1:
        runner = interpreter.get_signature_runner()
        names.update({name: d["index"] for name, d in runner.get_output_details().items()})
    for name, index in names.items():
        if "logits" in name.lower():
            return next(d for d in outputs if d["index"] == index)
    if len(outputs) == 1:
        return outputs[0]
    raise RunnerError(
        f"The model has {len(outputs)} outputs and none is named 'logits': {sorted(names)}."
    )


def input_size(interpreter):
    """The (height, width) the model's input expects."""
    _, height, width, _ = interpreter.get_input_details()[0]["shape"]
    return int(height), int(width)


def num_classes(interpreter):
    return int(_logits_details(interpreter)["shape"][1])


def read_images(paths):
    """Decodes each image file (any Pillow format) to an RGB `PIL.Image`."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            raise RunnerError(f"Image {path!r} is a directory; pass the image files in it.")
        if not os.path.isfile(path):
            raise RunnerError(f"Image file {path!r} does not exist.")
        try:
            with Image.open(path) as image:
                # Phone photos store their rotation in EXIF; apply it as a viewer would.
                images.append(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RunnerError(
                f"Image file {path!r} could not be read as an image: {str(e).rstrip('.')}."
            ) from e
    return images


def resize_images(images, height, width):
    """Bilinear-resizes RGB `PIL.Image`s to one uint8 array [N, height, width, 3]."""
    resized = [
        np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
        for image in images
    ]
    return np.stack(resized) if resized else np.zeros((0, height, width, 3), np.uint8)


def load_images(paths, height, width):
    """Reads image files and resizes them to uint8 [N, height, width, 3]."""
    return resize_images(read_images(paths), height, width)


def load_labels(path):
    """Reads class names, one a line; blank lines are ignored."""
    if not os.path.isfile(path):
        raise RunnerError(f"Labels file {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise RunnerError(f"Labels file {path!r} could not be read as UTF-8 text: {e}.") from e
    return labels


def check_labels(labels, path, classes):
    """Raises `RunnerError` unless there is exactly one label per model class."""
    if len(labels) != classes:
        raise RunnerError(
            f"Labels file {path!r} has {len(labels)} labels but the model has {classes} classes."
        )


def _quantize_input(pixels, details):
    """Raw 0..255 pixels as the input tensor expects them."""
    dtype = details["dtype"]
    scale, zero_point = details["quantization"]
    if dtype == np.float32:
        return pixels.astype(np.float32)
    if scale == 0:
        # An unquantized integer input takes the raw pixel values as they are.
        return pixels.astype(dtype)
    info = np.iinfo(dtype)
    quantized = np.round(pixels.astype(np.float32) / scale) + zero_point
    return np.clip(quantized, info.min, info.max).astype(dtype)


def _dequantize_output(values, details):
    scale, zero_point = details["quantization"]
    if values.dtype == np.float32 or scale == 0:
        return values.astype(np.float32)
    return (values.astype(np.float32) - zero_point) * scale


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def classify(interpreter, images):
    """Class probabilities float32 [N, classes] for uint8 images [N, H, W, 3].

    The images must already have the model's input size (see `load_images`). A model with
    batch dimension B runs ceil(N / B) times; the last batch is zero-padded.
    """
    input_details = interpreter.get_input_details()[0]
    logits_details = _logits_details(interpreter)
    batch, height, width, _ = (int(d) for d in input_details["shape"])
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (height, width, 3):
        raise RunnerError(
            f"Images must be uint8 [N, {height}, {width}, 3], got {images.dtype} "
            f"{list(images.shape)}."
        )
    logits = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = np.zeros((batch, height, width, 3), np.uint8)
        padded[: len(chunk)] = chunk
        interpreter.set_tensor(input_details["index"], _quantize_input(padded, input_details))
        interpreter.invoke()
        output = interpreter.get_tensor(logits_details["index"])
        logits.append(_dequantize_output(output, logits_details)[: len(chunk)])
    if not logits:
        return np.zeros((0, int(logits_details["shape"][1])), np.float32)
    return softmax(np.concatenate(logits))


def benchmark(interpreter, warmup=10, runs=100, images=None):
    """Times `invoke()` at the model's batch size; returns latency statistics in ms.

    The input is the first of `images` (uint8 [N, H, W, 3]) or random pixels. Only
    `invoke()` is timed, not pre- or post-processing. `cpu_ms` is the median process CPU
    time per call (all threads): on a busy device the wall clock includes waiting for a
    core, the CPU time does not.
    """
    if runs < 1 or warmup < 0:
        raise RunnerError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}.")
    details = interpreter.get_input_details()[0]
    shape = tuple(int(d) for d in details["shape"])
    if images is not None and len(images):
        pixels = np.broadcast_to(np.asarray(images)[:1], shape)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    interpreter.set_tensor(details["index"], _quantize_input(pixels, details))
    for _ in range(warmup):
        interpreter.invoke()
    times_ms, cpu_ms = np.empty(runs), np.empty(runs)
    for i in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        interpreter.invoke()
        times_ms[i] = (time.perf_counter() - start) * 1e3
        cpu_ms[i] = (time.process_time() - start_cpu) * 1e3
    return {
        "median_ms": float(np.median(times_ms)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "mean_ms": float(times_ms.mean()),
        "min_ms": float(times_ms.min()),
        "cpu_ms": float(np.median(cpu_ms)),
        "runs": runs,
        "batch_size": shape[0],
        "threads": getattr(interpreter, "num_threads", None),
    }


def top_k(probabilities, labels, k):
    """The k most probable classes as dicts {label, index, probability}, best first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {"label": labels[i], "index": int(i), "probability": float(probabilities[i])} for i in order
    ]


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see --help).\n")


def _parse_args(argv):
    parser = _ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--model", required=True, help="the .tflite file")
    parser.add_argument("--labels", help="class names, one a line (default: class indices)")
    parser.add_argument("--top_k", type=int, default=3, help="classes printed per image")
    parser.add_argument(
        "--threads",
        type=_thread_counts,
        default=None,
        help="LiteRT threads (default: CPU cores); with --benchmark a comma list, e.g. 1,2,4",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--benchmark", action="store_true", help="time invoke() instead")
    parser.add_argument("--warmup", type=int, default=10, help="untimed benchmark runs")
    parser.add_argument("--runs", type=int, default=100, help="timed benchmark runs")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k must be >= 1, got {args.top_k}")
    if args.threads is not None and len(args.threads) > 1 and not args.benchmark:
        parser.error(f"--threads takes one value to classify, got {len(args.threads)}")
    if args.runs < 1 or args.warmup < 0:
        parser.error(f"--runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    if not args.benchmark and not args.images:
        parser.error("give at least one IMAGE to classify, or --benchmark")
    return args


def _thread_counts(text):
    """`--threads` "4" or "1,2,4" as a tuple of positive integers."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers, got {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return counts


def format_latency(records, name):
    """Benchmark records as one table, a row per thread count (`LATENCY_COLUMNS`)."""
    width = max(len(name), 5) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{h:>{w}}" for _, h, w, _ in LATENCY_COLUMNS)]
    for record in records:
        cells = "".join(f"{record[key]:>{w}{spec}}" for key, _, w, spec in LATENCY_COLUMNS)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def _benchmark_all(args, pixels):
    """One benchmark record per `--threads` value, each on its own interpreter."""
    records = []
    for threads in args.threads or (default_threads(),):
        interpreter = load_interpreter(args.model, threads)
        record = {"model": args.model, "warmup": args.warmup}
        record.update(benchmark(interpreter, args.warmup, args.runs, pixels))
        records.append(record)
    if args.json:
        print(json.dumps(records[0] if len(records) == 1 else records, indent=2))
        return
    print(format_latency(records, os.path.basename(args.model)))
    print(
        f"({args.runs} runs after {args.warmup} warm-up at batch {records[0]['batch_size']}; "
        "invoke() only)"
    )


def _run(args):
    # Check every input file before LiteRT loads the model and starts logging.
    check_model_file(args.model)
    images = read_images(args.images)
    labels = load_labels(args.labels) if args.labels and not args.benchmark else None
    interpreter = load_interpreter(args.model, args.threads[0] if args.threads else None)
    pixels = resize_images(images, *input_size(interpreter))
    if args.benchmark:
        _benchmark_all(args, pixels)
        return
    classes = num_classes(interpreter)
    if labels is None:
        labels = [str(i) for i in range(classes)]
    check_labels(labels, args.labels, classes)
    probabilities = classify(interpreter, pixels)
    results = [
        {"image": path, "top_k": top_k(p, labels, args.top_k)}
        for path, p in zip(args.images, probabilities, strict=True)
    ]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        print(result["image"])
        for rank, entry in enumerate(result["top_k"], start=1):
            print(
                f"  {rank}. {entry['label']:<24} {entry['probability']:7.2%}  "
                f"(class {entry['index']})"
            )


def main(argv=None):
    args = _parse_args(argv)
    try:
        _run(args)
    except RunnerError as e:
        print(f"run_tflite.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
