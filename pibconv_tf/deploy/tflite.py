"""TFLite conversion of a serving SavedModel; running, inspecting, timing and checking it.

`convert` turns a SavedModel written by `pibconv_tf.export.write_saved_model` into one of four
TFLite flavours, with TFLite built-in operations only (no Select TF ops):

- `tflite_fp32`: float32 weights and activations.
- `tflite_fp16`: float16 weights, float32 activations (half the file).
- `tflite_dynamic_int8`: int8 weights, activations quantized on the fly per operation.
- `tflite_int8`: int8 weights and activations calibrated on representative images, with
  integer (uint8 or int8) or float input and output. Every operation is integer: the form
  for integer-only accelerators (DSPs, NPUs, microcontrollers).
- `tflite_int8_mixed`: the same calibration and input/output, but the operations that have
  no fast int8 kernel on CPUs (`MIXED_FLOAT_OPS`) stay float32 between a dequantize and a
  quantize: the fastest format on CPUs with XNNPACK.

Batch normalisation folds into the convolutions during conversion (`op_counts` shows no
RSQRT or batch-norm operations left). The interpreter here is LiteRT's, the one the edge
device runs: `tflite_logits` feeds raw pixels and dequantizes logits, `benchmark_tflite`
times `invoke()`, and `parity_report` compares every artifact's logits with Keras'.

Reference:
    Jacob et al., Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference, arXiv 1712.05877.
"""

import collections
import os
import time
import warnings

import numpy as np
import tensorflow as tf
from ai_edge_litert import interpreter as litert
from keras import ops

from pibconv_tf.deploy.latency import quantize_pixels
from pibconv_tf.errors import RunError
from pibconv_tf.model import operations, pib_conv

TFLITE_FORMATS = (
    "tflite_fp32",
    "tflite_fp16",
    "tflite_dynamic_int8",
    "tflite_int8",
    "tflite_int8_mixed",
)
TFLITE_FILES = {
    "tflite_fp32": "model_fp32.tflite",
    "tflite_fp16": "model_fp16.tflite",
    "tflite_dynamic_int8": "model_dynamic_int8.tflite",
    "tflite_int8": "model_int8.tflite",
    "tflite_int8_mixed": "model_int8_mixed.tflite",
}
# Formats whose activations are calibrated on representative images.
CALIBRATED_FORMATS = ("tflite_int8", "tflite_int8_mixed")
# Operations `tflite_int8_mixed` keeps in float32: XNNPACK has no fast int8 kernel for
# them on x86 (measured in docs/performance.md: int8 RELU and AVERAGE_POOL_2D run in
# TFLite's reference kernels, 30x and 14x slower than float; int8 depthwise convolutions
# are 0.5-0.7x float's speed).
MIXED_FLOAT_OPS = ("RELU", "AVERAGE_POOL_2D", "DEPTHWISE_CONV_2D")
INT8_IO_TYPES = ("uint8", "int8")
PIB_IMPLEMENTATIONS = ("split", *pib_conv.IMPLEMENTATIONS)
SIGNATURE = "serving_default"
INPUT = "images"
LOGITS = "logits"
# Operation names that mean a graph did not lower to TFLite built-ins.
_FOREIGN_OP_PREFIXES = ("Flex", "CUSTOM")


class QuantizablePool3x3(operations.Pool3x3):
    """Max `Pool3x3` at stride 2 as a stride-1 "same" max pooling and a 2x subsampling.

    PyTorch's stride-2 window i covers rows 2i-1..2i+1, the stride-1 window centred on row
    2i; TensorFlow's "same" max pooling ignores padded cells, so the numbers are those of
    `Pool3x3`. The form matters for full-integer quantization: `Pool3x3` pads max pooling
    with a -inf constant, which the quantizer puts into the calibration range (an
    activation scale of ~1e36, all outputs saturate) and which XNNPACK refuses to prepare.
    Average pooling pads with zeros and keeps its own form: computing it at every pixel
    and subsampling costs 4x the work of an operation that has no XNNPACK int8 kernel (it
    made a 2-layer PIBCONV int8 model 1.3x slower).

    Used on a loaded model by `make_pools_quantizable`, for the calibrated (int8) formats only.
    """

    def call(self, inputs):
        if self.strides == 1 or self.pool_type != "max":  # not switched by make_pools_quantizable
            return super().call(inputs)
        return ops.max_pool(inputs, 3, 1, padding="same")[:, ::2, ::2, :]


def make_pools_quantizable(model):
    """Switches every stride-2 max `Pool3x3` of `model` to `QuantizablePool3x3`; returns
    how many.

    Call it on a freshly loaded model, before anything traces it.
    """
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer) is operations.Pool3x3 and layer.strides == 2 and layer.pool_type == "max":
            layer.__class__ = QuantizablePool3x3
            count += 1
    return count


class SplitPIBConv(pib_conv.PIBConv):
    """`PIBConv` whose grouped convolution is a depthwise convolution and a sum of halves.

    PIBConv's "depthwise" form orders the F*C expanded channels group-major (channel
    g*F + i is input i of group g) and sums each group with a reshape to 5-D and a SUM over
    the last axis, which TFLite runs slowly (3x the depthwise convolution itself in float32,
    and worse in int8). Here the expanded channels are ordered expansion-major (channel
    i*C + g), so the group sums are F contiguous channel slices added together: unit-stride
    STRIDED_SLICEs and an ADD, which XNNPACK runs at memory speed. `make_pib_convs_split`
    permutes the 1x1 expansion kernel's output channels to match, so the numbers are
    PIBConv's.
    """

    def _grouped_conv(self, x):
        k, f, c = self.kernel_size, self.expansion, self.filters
        kernel = ops.reshape(ops.cast(self.grouped_kernel, x.dtype), (k, k, f * c, 1))
        y = ops.depthwise_conv(x, kernel, strides=1, padding="same")
        total = y[..., :c]
        for i in range(1, f):
            total = total + y[..., i * c : (i + 1) * c]
        return total


def make_pib_convs_split(model):
    """Switches every PIBConv of a freshly loaded `model` to `SplitPIBConv`, permuting its
    expansion kernel from group-major to expansion-major output channels; returns how many.

    The model's weights change: use it for conversion only, never save it.
    """
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer) is pib_conv.PIBConv:
            kernel = ops.convert_to_numpy(layer.pw_expand.kernel)
            rows, c, f = kernel.shape[2], layer.filters, layer.expansion
            kernel = kernel.reshape(1, 1, rows, c, f).transpose(0, 1, 2, 4, 3)
            layer.pw_expand.kernel.assign(kernel.reshape(1, 1, rows, f * c))
            layer.__class__ = SplitPIBConv
            count += 1
    return count


def set_pib_implementation(model, implementation):
    """Switches every PIBConv to "split" (`make_pib_convs_split`) or to one of its own
    implementations ("depthwise", "grouped"); returns how many."""
    if implementation == "split":
        return make_pib_convs_split(model)
    return pib_conv.set_implementation(model, implementation)


def convert(saved_model_dir, fmt, representative_images=None, int8_io_type="uint8", batch_size=1):
    """Converts the `serving_default` signature of a SavedModel to TFLite `fmt`.

    Args:
        saved_model_dir: a SavedModel whose serving signature takes float32 raw pixels
            `images` [B, H, W, 3] with a fixed batch B and returns `logits` and
            `probabilities`.
        fmt: one of `TFLITE_FORMATS`.
        representative_images: uint8 [N, H, W, 3] calibration images (train split), needed
            by `CALIBRATED_FORMATS` only; N is cut to a multiple of B.
        int8_io_type: "uint8", "int8" or None (float32 input and output) for
            `CALIBRATED_FORMATS`.
        batch_size: the signature's batch size, for the calibration batches.

    Returns:
        The flatbuffer bytes.
    """
    if fmt not in TFLITE_FORMATS:
        raise ValueError(f"Unknown TFLite format {fmt!r}; expected one of {TFLITE_FORMATS}.")
    if fmt in CALIBRATED_FORMATS and (
        representative_images is None or not len(representative_images)
    ):
        raise ValueError(f"{fmt} needs representative images for calibration.")
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=[SIGNATURE]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if fmt == "tflite_fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif fmt == "tflite_dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif fmt == "tflite_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = _representative_dataset(
            representative_images, batch_size
        )
        if int8_io_type is not None:
            converter.inference_input_type = tf.as_dtype(int8_io_type)
            converter.inference_output_type = tf.as_dtype(int8_io_type)
    elif fmt == "tflite_int8_mixed":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative_dataset(
            representative_images, batch_size
        )
    with warnings.catch_warnings():
        # Calibration runs the deprecated tf.lite.Interpreter; the warning is not ours.
        warnings.filterwarnings("ignore", "(?s).*tf.lite.Interpreter is deprecated")
        if fmt == "tflite_int8_mixed":
            content = _quantize_mixed(converter, int8_io_type)
        else:
            content = converter.convert()
    check_builtin_ops(op_counts(content), fmt)
    return content


def _quantize_mixed(converter, io_type):
    """Calibrates and quantizes with `MIXED_FLOAT_OPS` left float; `io_type` as `convert`.

    TensorFlow's public `QuantizationDebugger` (selective quantization by its op denylist)
    calibrates with the converter's representative dataset and quantizes; its model has
    float input and output. Setting an integer input and output type afterwards has no
    public API: `modify_model_io_type` is the converter's own (internal) pass for it, as in
    `tflite_int8` (pinned TensorFlow; tests/test_deploy.py checks operand types and I/O).
    """
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(MIXED_FLOAT_OPS))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=converter.representative_dataset,
        debug_options=options,
    )
    content = debugger.get_nondebug_quantized_model()
    if io_type is None:
        return content
    from tensorflow.lite.python import util as lite_util  # noqa: PLC0415 (internal)

    io = tf.as_dtype(io_type)
    return lite_util.modify_model_io_type(content, io, io)


def _representative_dataset(images, batch):
    images = np.asarray(images, np.float32)

    def generate():
        for start in range(0, len(images) - batch + 1, batch):
            yield {INPUT: images[start : start + batch]}

    return generate


def _interpreter(model, threads=None, delegates=True):
    kwargs = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    if not delegates:
        kwargs["experimental_op_resolver_type"] = (
            litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    interpreter = litert.Interpreter(num_threads=threads, **kwargs)
    interpreter.allocate_tensors()
    return interpreter


def op_counts(model):
    """{TFLite operation name: count} of a model (bytes or path), before any delegate."""
    details = _interpreter(model, delegates=False)._get_ops_details()
    return dict(collections.Counter(op["op_name"] for op in details).most_common())


def check_builtin_ops(counts, fmt):
    """Raises RunError if a converted model holds Select TF (Flex) or custom operations."""
    foreign = sorted(name for name in counts if name.startswith(_FOREIGN_OP_PREFIXES))
    if foreign:
        raise RunError(
            f"The {fmt} model needs operations outside the TFLite built-ins: {foreign}; "
            "it would not run on a plain LiteRT interpreter."
        )


def io_details(model):
    """Shape, dtype and (scale, zero point) of the input and the logits of a TFLite model."""
    runner = _interpreter(model, delegates=False).get_signature_runner(SIGNATURE)

    def describe(details):
        scale, zero_point = details["quantization"]
        return {
            "shape": [int(d) for d in details["shape"]],
            "dtype": np.dtype(details["dtype"]).name,
            "scale": float(scale),
            "zero_point": int(zero_point),
        }

    outputs = runner.get_output_details()
    return {
        "input": describe(runner.get_input_details()[INPUT]),
        "outputs": {name: describe(details) for name, details in sorted(outputs.items())},
    }


def dequantize(values, details):
    scale, zero_point = details["quantization"]
    if values.dtype == np.float32 or scale == 0:
        return values.astype(np.float32)
    return (values.astype(np.float32) - zero_point) * scale


def tflite_logits(model, images, threads=None):
    """Float32 logits [N, classes] of a TFLite model for uint8 pixels [N, H, W, 3].

    Runs at the model's fixed batch size (the last batch zero-padded), quantizing the
    input and dequantizing the logits as the model's tensors ask.
    """
    runner = _interpreter(model, threads).get_signature_runner(SIGNATURE)
    input_details = runner.get_input_details()[INPUT]
    logits_details = runner.get_output_details()[LOGITS]
    batch = int(input_details["shape"][0])
    outputs = []
    for start in range(0, len(images), batch):
        chunk = np.asarray(images[start : start + batch])
        padded = np.zeros((batch, *chunk.shape[1:]), chunk.dtype)
        padded[: len(chunk)] = chunk
        result = runner(**{INPUT: quantize_pixels(padded, input_details)})
        outputs.append(dequantize(result[LOGITS], logits_details)[: len(chunk)])
    return np.concatenate(outputs) if outputs else np.zeros((0, logits_details["shape"][1]))


def time_runs(function, runs):
    """Calls `function` `runs` times; returns wall-clock latency statistics in ms, and the
    median process CPU time per call (`cpu_ms`, all threads): on a shared machine the wall
    clock includes waiting for a core, the CPU time does not."""
    wall, cpu = np.empty(runs), np.empty(runs)
    for i in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall[i] = (time.perf_counter() - start) * 1e3
        cpu[i] = (time.process_time() - start_cpu) * 1e3
    return {
        "median_ms": float(np.median(wall)),
        "p90_ms": float(np.percentile(wall, 90)),
        "mean_ms": float(wall.mean()),
        "min_ms": float(wall.min()),
        "cpu_ms": float(np.median(cpu)),
        "runs": runs,
    }


def benchmark_tflite(path, threads=1, warmup=10, runs=100):
    """Times `invoke()` of a TFLite model with LiteRT (default delegates, i.e. XNNPACK).

    The input is one fixed batch of random pixels at the model's batch size; only
    `invoke()` is timed.

    Returns:
        {median_ms, p90_ms, mean_ms, min_ms (wall clock), cpu_ms (median process CPU time
        per invoke, all threads), runs, threads, warmup, batch_size, bytes}.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got {runs} and {warmup}.")
    interpreter = _interpreter(path, threads)
    details = interpreter.get_input_details()[0]
    shape = tuple(int(d) for d in details["shape"])
    pixels = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    interpreter.set_tensor(details["index"], quantize_pixels(pixels, details))
    for _ in range(warmup):
        interpreter.invoke()
    return {
        **time_runs(interpreter.invoke, runs),
        "threads": threads,
        "warmup": warmup,
        "batch_size": shape[0],
        "bytes": os.path.getsize(path),
    }


def benchmark_models(paths, threads=(1, 2), warmup=10, runs=100, rounds=1):
    """`benchmark_tflite` rows {"artifact": name, ...} for each {name: path} and thread count.

    With `rounds` > 1 the models are timed in turn, round after round, and each row keeps
    its round with the lowest median: on a shared machine, load that comes and goes then
    biases no model against another.
    """
    best = {}
    for _ in range(rounds):
        for name, path in paths.items():
            for count in threads:
                stats = benchmark_tflite(path, count, warmup, runs)
                if (name, count) not in best or stats["median_ms"] < best[name, count]["median_ms"]:
                    best[name, count] = stats
    return [{"artifact": name, **stats, "rounds": rounds} for (name, _), stats in best.items()]


def format_latency(rows):
    """Latency rows (`benchmark_models`, `benchmark_keras`) as a text table."""
    lines = [f"{'artifact':<24}{'threads':>8}{'median ms':>11}{'p90 ms':>9}{'CPU ms':>9}{'MB':>8}"]
    for row in rows:
        size = f"{row['bytes'] / 1e6:8.2f}" if "bytes" in row else f"{'-':>8}"
        threads = "default" if row.get("threads") is None else row["threads"]
        lines.append(
            f"{row['artifact']:<24}{threads:>8}{row['median_ms']:11.2f}{row['p90_ms']:9.2f}"
            f"{row['cpu_ms']:9.2f}{size}"
        )
    return "\n".join(lines)


def benchmark_keras(model, warmup=10, runs=100, batch_size=1):
    """Times a batch of `model` in a compiled `tf.function` (what `predict` runs)."""
    size = int(model.input.shape[1])
    images = tf.constant(np.random.default_rng(0).normal(size=(batch_size, size, size, 3)))
    images = tf.cast(images, tf.float32)
    call = tf.function(lambda x: model(x, training=False))
    for _ in range(max(warmup, 1)):
        call(images).numpy()
    stats = time_runs(lambda: call(images).numpy(), runs)
    return {**stats, "warmup": warmup, "batch_size": batch_size}


def parity_report(keras_logits, outputs, labels=None, tolerance=1e-4, checked=()):
    """Each artifact's logits against Keras' on the same images.

    Per artifact: max and mean |logit difference|, top-1 agreement with Keras, accuracy
    (with labels), and for the `checked` artifacts whether they pass: max
    difference <= `tolerance` and no top-1 disagreement outside near ties (a Keras top-2
    margin <= 2 * tolerance, where a difference within tolerance may flip the order).
    """
    keras_logits = np.asarray(keras_logits, np.float64)
    reference = keras_logits.argmax(-1)
    top2 = np.sort(keras_logits, axis=-1)[:, -2:]
    near_tie = top2[:, 1] - top2[:, 0] <= 2 * tolerance

    def accuracy(predictions):
        return None if labels is None else float(np.mean(predictions == np.asarray(labels)))

    rows = {"keras": {"accuracy": accuracy(reference)}}
    for name, logits in outputs.items():
        difference = np.abs(np.asarray(logits, np.float64) - keras_logits)
        predictions = np.asarray(logits).argmax(-1)
        disagree = predictions != reference
        row = {
            "max_abs_logit_diff": float(difference.max()),
            "mean_abs_logit_diff": float(difference.mean()),
            "top1_agreement": float(1.0 - disagree.mean()),
            "accuracy": accuracy(predictions),
        }
        if name in checked:
            decisive = int(np.sum(disagree & ~near_tie))
            row["passed"] = bool(row["max_abs_logit_diff"] <= tolerance and decisive == 0)
        rows[name] = row
    return {"tolerance": tolerance, "artifacts": rows}


def check_parity(report):
    """Raises RunError if a float32 artifact failed its parity check."""
    failed = {n: r for n, r in report["artifacts"].items() if r.get("passed") is False}
    if failed:
        details = ", ".join(
            f"{n} (max |logit diff| {r['max_abs_logit_diff']:.2e}, top-1 agreement "
            f"{r['top1_agreement']:.2%})"
            for n, r in failed.items()
        )
        raise RunError(
            f"Float32 export does not match Keras within {report['tolerance']:g}: {details}; "
            "see parity.json."
        )


def format_parity(report):
    """The parity report as a text table."""

    def cell(value, spec):
        return f"{'-':>{spec.split('.')[0]}}" if value is None else format(value, spec)

    lines = [
        f"{'artifact':<22}{'max|dlogit|':>13}{'mean|dlogit|':>14}{'top-1 agree':>13}"
        f"{'accuracy':>10}  check"
    ]
    for name, row in report["artifacts"].items():
        check = {True: "ok", False: "FAILED", None: ""}[row.get("passed")]
        lines.append(
            f"{name:<22}{cell(row.get('max_abs_logit_diff'), '13.2e')}"
            f"{cell(row.get('mean_abs_logit_diff'), '14.2e')}"
            f"{cell(row.get('top1_agreement'), '13.2%')}"
            f"{cell(row.get('accuracy'), '10.2%')}  {check}"
        )
    return "\n".join(lines)
