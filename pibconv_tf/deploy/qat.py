"""Quantization-aware fine-tuning (QAT) of a trained `model.keras` for full-integer TFLite.

`run_qat` loads a trained model, rewrites it in place into a fake-quant graph (`FakeQuantGraph`)
with Keras' own `keras.quantizers.fake_quant_with_min_max_vars`, fine-tunes it for a few epochs
at a small learning rate on the train split, and exports the fine-tuned float weights as the
full-integer `tflite_int8` of `export.export_model`, next to the post-training int8 model of the
original weights. Both are scored on the same test images; `parity.json` holds the rows.

What is fake-quantized, following TFLite's int8 scheme (arXiv 1712.05877, TFLite's 8-bit spec):

- Weights: per output channel, symmetric, 255 levels ([-127, 127] x max|w| / 127) for every
  `Conv2D`, `DepthwiseConv2D` (per channel of the C x multiplier outputs), `Dense` and the
  grouped kernel of `PIBConv` (per channel of its depthwise form, as in the TFLite graph).
- BatchNorm: frozen (moving statistics, i.e. the model runs in inference mode while it is
  fine-tuned), as once TFLite has folded it into the convolution before it. The folded kernel
  is kernel x gamma / sqrt(var + eps) per output channel, and per-channel symmetric
  quantization commutes with a per-channel scale, q(s w) = s q(w), so quantizing the unfolded
  kernel gives the folded kernel's grid exactly: no explicit fold is needed.
- Activations: per tensor, asymmetric, 256 levels, ranges holding 0, at the network input
  (after normalisation), every BatchNorm output (the fused conv + BN output), every convolution
  output that is neither folded into a BatchNorm nor fused with a ReLU (both found by a probe
  pass), ReLU and GELU outputs, PIBConv's grouped products and their sum, average pools, every
  node sum of a cell on the cell's concat grid (TFLite gives a concat's inputs its scale), the
  global pool and the logits. Not modelled: the normalisation's multiply, constant operands
  (a BatchNorm after a concat, an average pool's divisor) and max pools (which keep their
  input's scale).

Ranges are not moving averages. They are the float model's min/max over the export's own
calibration images, re-measured before every epoch and after the last. That is what the
post-training calibration of `export_model` measures, so each range is the one the int8 model
gets. A single block's fake-quant output equals its int8 TFLite output to within one
quantization step (tests/test_qat.py). On a whole network the unmodelled roundings build up:
the fake-quant logits differ from the int8 model's by about as much as float32's do, though
the two give the same top-1 (99.7-100% agreement on digits).

How the int8 model is made (measured; docs/export.md): the fine-tuned float weights are saved
as `model_qat.keras` and converted by `export_model`'s post-training calibration (the "strip
fake-quant, calibrate the fine-tuned weights" route). The converter's other route reads the
ranges of the graph's FakeQuantWithMinMaxVars operations from a SavedModel (tfmot's). It
converted a conv + BN + ReLU block to exactly the fake-quant numbers, but failed inside the
converter on the whole network, so it is not used.

Example:
```python
config = QATConfig(model="runs/digits/model.keras", output_dir="runs/digits/qat",
                   dataset="digits", epochs=3)
report = run_qat(config)  # report["top1"]: fp32, ptq_int8, qat_int8, qat_fake_quant
```
"""

import dataclasses
import json
import math
import pathlib
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras import ops

from pibconv_tf import data, runs
from pibconv_tf.deploy import export, tflite
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import numerics as L
from pibconv_tf.model import operations, pib_conv
from pibconv_tf.model.cells import Cell
from pibconv_tf.runs import write_json_atomic

QAT_MODEL = "model_qat.keras"
PTQ_DIR = "ptq"
QAT_DIR = "qat"
INT8 = "tflite_int8"
_EPSILON = 1e-8


def quantize_weight(kernel, channels):
    """Per-channel symmetric int8 fake quantization (255 levels) of `kernel`.

    `channels` is how many trailing axes index the channel (1 for Conv2D and Dense; 2 for a
    DepthwiseConv2D's [C, multiplier] and PIBConv's [F, C] grouped kernel).
    """
    shape = ops.shape(kernel)
    # No reshape for one channel axis: the converter then reads the ranges (a reshaped
    # per-channel FakeQuant does not convert).
    flat = kernel if channels == 1 else ops.reshape(kernel, (*kernel.shape[:-channels], -1))
    axes = tuple(range(len(flat.shape) - 1))
    bound = ops.maximum(ops.stop_gradient(ops.max(ops.abs(flat), axis=axes)), _EPSILON)
    flat = keras.quantizers.fake_quant_with_min_max_vars(
        flat, -bound, bound, num_bits=8, narrow_range=True, axis=-1
    )
    return flat if channels == 1 else ops.reshape(flat, shape)


class FakeQuantGraph:
    """The layers of a model switched, in place, to fake-quantizing forms.

    Weight and activation quantization as listed in the module docstring. Each activation point
    keeps its [min, max] in a `keras.Variable` outside the layers (a built Keras layer takes no
    new state); `calibrate` sets them. `mode` ("quantize", "float") is read when a function is
    traced. `restore` switches the layers back, leaving the fine-tuned weights in the model.

    Args:
        model: a freshly loaded logits-only `network_cifar` model (nothing traced yet).

    Example:
    ```python
    graph = FakeQuantGraph(model)
    graph.calibrate(normalized_images)
    logits = graph(normalized_images)
    ```
    """

    def __init__(self, model):
        self.model = model
        self.mode = "quantize"
        self.ranges = {}
        self._record = None  # {point: [min, max]} while calibrating
        self._probe = None
        self._switched = []
        for layer in model._flatten_layers(include_self=False, recursive=True):
            cls = type(layer)
            if cls in _SWITCHES:
                object.__setattr__(layer, "_qat_graph", self)
                self._switched.append((layer, cls))
                layer.__class__ = _SWITCHES[cls]
        self._folded = set()
        self._find_folded_convolutions()

    def __call__(self, images):
        """Logits of normalised images, fake-quantized in "quantize" mode."""
        return self.model(self.point("input", images), training=False)

    def weight(self, kernel, channels):
        """`quantize_weight` in "quantize" mode, else `kernel` (calibration sees float weights)."""
        return kernel if self.mode != "quantize" else quantize_weight(kernel, channels)

    def observe(self, name, x):
        """Records `x` during the probe pass only (a BatchNorm's input)."""
        if self._probe is not None:
            self._probe.append((name, x))

    def point(self, name, x):
        if self._probe is not None:
            self._probe.append((name, x))
            return x
        if self._record is not None:
            low, high = float(ops.min(x)), float(ops.max(x))
            seen = self._record.setdefault(name, [low, high])
            seen[:] = [min(seen[0], low), max(seen[1], high)]
            return x
        if self.mode != "quantize" or name in self._folded:
            return x
        bounds = self.ranges[name]
        return keras.quantizers.fake_quant_with_min_max_vars(x, bounds[0], bounds[1], num_bits=8)

    def _find_folded_convolutions(self):
        """Finds the points TFLite fuses away: a convolution read by a BatchNorm, and a
        convolution or BatchNorm read by a ReLU (no tensor between them to quantize)."""
        self._probe = []
        self(np.zeros((1, *self.model.input.shape[1:]), np.float32))
        outputs = {id(x): name for name, x in self._probe if name.endswith((":conv", ":bn_out"))}
        self._folded = set()
        for name, x in self._probe:
            source = outputs.get(id(x))
            by_relu = name.endswith(":relu_in")
            if source and (by_relu or (name.endswith(":bn") and source.endswith(":conv"))):
                self._folded.add(source)
        self._probe = None

    def calibrate(self, images, batch_size=64):
        """Sets every range to the float model's min/max (holding 0) over `images`, as the
        int8 conversion's calibration measures them (float weights, no fake quantization)."""
        self._record, mode, self.mode = {}, self.mode, "float"
        try:
            for start in range(0, len(images), batch_size):
                self(images[start : start + batch_size])
            record = self._record
        finally:
            self._record, self.mode = None, mode
        for name, (low, high) in record.items():
            bounds = np.array([min(low, 0.0), max(high, 0.0)], np.float32)
            if name in self.ranges:
                self.ranges[name].assign(bounds)
            else:
                self.ranges[name] = keras.Variable(bounds, trainable=False, name="qat_range")

    def restore(self):
        for layer, cls in self._switched:
            layer.__class__ = cls
            object.__delattr__(layer, "_qat_graph")


class _QuantizedConv2D(keras.layers.Conv2D):
    def call(self, inputs):
        kernel = self._qat_graph.weight(self.kernel, 1)
        outputs = ops.conv(
            inputs,
            kernel,
            strides=list(self.strides),
            padding=self.padding,
            dilation_rate=self.dilation_rate,
        )
        if self.use_bias:
            outputs = outputs + self.bias
        return self._qat_graph.point(f"{self.path}:conv", outputs)


class _QuantizedDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    def call(self, inputs):
        kernel = self._qat_graph.weight(self.kernel, 2)
        outputs = ops.depthwise_conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
        )
        if self.use_bias:
            outputs = outputs + self.bias
        return self._qat_graph.point(f"{self.path}:conv", outputs)


class _QuantizedDense(keras.layers.Dense):
    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, self._qat_graph.weight(self.kernel, 1))
        if self.bias is not None:
            outputs = outputs + self.bias
        return self._qat_graph.point(f"{self.path}:dense", outputs)


class _QuantizedBatchNormalization(keras.layers.BatchNormalization):
    def call(self, inputs, training=None, mask=None):
        self._qat_graph.observe(f"{self.path}:bn", inputs)
        outputs = super().call(inputs, training=False)
        return self._qat_graph.point(f"{self.path}:bn_out", outputs)


class _QuantizedReLU(keras.layers.ReLU):
    def call(self, inputs):
        self._qat_graph.observe(f"{self.path}:relu_in", inputs)
        return self._qat_graph.point(f"{self.path}:relu", super().call(inputs))


class _QuantizedGlobalAveragePooling2D(keras.layers.GlobalAveragePooling2D):
    def call(self, inputs):
        return self._qat_graph.point(f"{self.path}:mean", super().call(inputs))


def _activate(layer, x, index):
    """`L.activation` with its output quantized (a ReLU fuses into the op before it)."""
    name = f"{layer.path}:activation_{index}"
    if layer.activation == "relu":
        layer._qat_graph.observe(f"{name}:relu_in", x)
    return layer._qat_graph.point(name, L.activation(x, layer.activation, False))


class _QuantizedDilConv(operations.DilConv):
    def call(self, inputs, training=None):
        pad = self.dilation_rate * (self.kernel_size - 1) // 2
        x = L.depthwise(self.dw, _activate(self, inputs, 0), False, pad)
        return L.norm(self.bn, L.conv(self.pw, x), False)


class _QuantizedSepConv(operations.SepConv):
    def call(self, inputs, training=None):
        pad = self.kernel_size // 2
        x = L.depthwise(self.dw_1, _activate(self, inputs, 0), False, pad)
        x = L.norm(self.norm_1, L.conv(self.pw_1, x), False)
        x = L.depthwise(self.dw_2, _activate(self, x, 1), False, pad)
        return L.norm(self.norm_2, L.conv(self.pw_2, x), False)


class _QuantizedPool3x3(tflite.QuantizablePool3x3):
    # Max pooling keeps its input's scale in TFLite; average pooling requantizes (at stride 2
    # the window sums and their division by the real cells' count, `Pool3x3`).
    def call(self, inputs):
        if self.pool_type == "max":
            return super().call(inputs)
        if self.strides == 1:
            return self._qat_graph.point(f"{self.path}:avg", super().call(inputs))
        summed = ops.average_pool(L.symmetric_pad(inputs, 2, 1), 3, 2, padding="valid")
        summed = self._qat_graph.point(f"{self.path}:avg_sum", summed)
        ones = ops.ones_like(inputs[:1, :, :, :1])
        counts = ops.average_pool(L.symmetric_pad(ones, 2, 1), 3, 2, padding="valid")
        return self._qat_graph.point(f"{self.path}:avg", summed / counts)


class _QuantizedCell(Cell):
    # Every node sum is quantized on the concat's grid: TFLite gives a concat's inputs the
    # scale of its output, so later nodes read the sums as rounded there.
    def call(self, inputs, training=None):
        name = f"{self.path}:cell"
        s0, s1 = inputs
        states = [self.preprocess0(s0, training=False), self.preprocess1(s1, training=False)]
        for node in range(len(self.edges) // 2):
            total = None
            for position in (2 * node, 2 * node + 1):
                h = self.edge_ops[position](states[self.edges[position][1]], training=False)
                total = h if total is None else total + h
            states.append(self._qat_graph.point(name, total))
        return ops.concatenate([states[i] for i in self.concat], axis=-1)


class _QuantizedPIBConv(pib_conv.PIBConv):
    def call(self, inputs, training=None):
        x = L.depthwise(self.dw, inputs, False, self.kernel_size // 2)
        x = L.norm(self.bn, x, False)
        grouped = self._qat_graph.point(
            f"{self.path}:grouped", self._grouped_conv(L.conv(self.pw_expand, x))
        )
        x = self._qat_graph.point(f"{self.path}:gelu", L.gelu(grouped, False))
        return L.conv(self.pw_project, x)

    def _grouped_conv(self, x):
        # PIBConv's depthwise form (its expansion kernel is group-major); each (i, g) of the
        # [F, C] kernel is one channel of TFLite's depthwise kernel in either channel order.
        k, f, c = self.kernel_size, self.expansion, self.filters
        kernel = ops.transpose(self._qat_graph.weight(self.grouped_kernel, 2), (0, 1, 3, 2))
        y = ops.depthwise_conv(x, ops.reshape(kernel, (k, k, c * f, 1)), strides=1, padding="same")
        y = self._qat_graph.point(f"{self.path}:taps", y)  # the F*C products before the sums
        shape = ops.shape(y)
        return ops.sum(ops.reshape(y, (-1, shape[1], shape[2], c, f)), axis=-1)


_SWITCHES = {
    keras.layers.Conv2D: _QuantizedConv2D,
    keras.layers.DepthwiseConv2D: _QuantizedDepthwiseConv2D,
    keras.layers.Dense: _QuantizedDense,
    keras.layers.BatchNormalization: _QuantizedBatchNormalization,
    keras.layers.ReLU: _QuantizedReLU,
    keras.layers.GlobalAveragePooling2D: _QuantizedGlobalAveragePooling2D,
    operations.DilConv: _QuantizedDilConv,
    operations.SepConv: _QuantizedSepConv,
    operations.Pool3x3: _QuantizedPool3x3,
    tflite.QuantizablePool3x3: _QuantizedPool3x3,
    Cell: _QuantizedCell,
    pib_conv.PIBConv: _QuantizedPIBConv,
}


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """What `run_qat` does; the fields mirror `apps.qat`'s flags.

    Attributes:
        model: the logits-only `model.keras` written by training.
        output_dir: directory receiving `model_qat.keras`, `ptq/`, `qat/` and `parity.json`.
        dataset, data_dir, seed: `data.load_source` (train split: fine-tuning and calibration;
            test split: the comparison); seed None takes the training run's (`config.json`
            next to the model, else 0), so that digits and folder datasets split as in training.
        epochs: fine-tuning epochs (> 0).
        learning_rate: constant SGD learning rate (momentum 0.9).
        batch_size: fine-tuning batch size.
        calibration_images: train images calibrating both int8 models (and the fake-quant
            ranges).
        test_images: test images of the comparison (None: the whole test split).
        train_images: the first train images fine-tuning (None: the whole train split).
        overwrite: replace a non-empty `output_dir`.
    """

    model: str
    output_dir: str
    dataset: str
    data_dir: str | None = None
    seed: int | None = None
    epochs: int = 3
    learning_rate: float = 1e-3
    batch_size: int = 32
    calibration_images: int = 300
    test_images: int | None = None
    train_images: int | None = None
    overwrite: bool = False

    def validate(self):
        """Raises UserInputError naming the first bad field; touches no file."""
        if not self.dataset:
            raise UserInputError(
                "--dataset is required: its train split fine-tunes and calibrates."
            )
        for name in ("epochs", "batch_size", "calibration_images"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("test_images", "train_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserInputError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserInputError(
                f"--learning_rate must be a finite number > 0, got {self.learning_rate}."
            )
        if not pathlib.Path(self.model).is_file():
            raise UserInputError(f"--model {self.model!r} is not a file (a trained model.keras).")

    def to_dict(self):
        return dataclasses.asdict(self)

    def export_config(self, model, output_dir, test_images):
        return export.ExportConfig(
            model=str(model),
            output_dir=str(output_dir),
            formats=(INT8,),
            dataset=self.dataset,
            data_dir=self.data_dir,
            seed=self.seed,
            calibration_images=self.calibration_images,
            parity_images=test_images,
        )


def run_qat(config):
    """Post-training int8 of `config.model`, QAT fine-tuning, int8 of the fine-tuned model.

    Returns:
        The report written to `parity.json`: "top1" (fp32, ptq_int8, qat_fp32, qat_int8,
        qat_fake_quant on the same test images), the fake-quant model's agreement with the QAT
        int8 model, per-epoch history, settings.

    Raises:
        UserInputError: bad config, model, dataset or output directory, before any file is
            written.
    """
    config.validate()
    config = dataclasses.replace(config, seed=training_seed(config))
    output_dir = export.prepare_output_dir(
        config.output_dir, config.overwrite, protect=[config.model]
    )
    model = export.load_inference_model(config.model)
    size = int(model.input.shape[1])
    source = data.load_source(config.dataset, config.data_dir, size, config.seed)
    test_images = min(config.test_images or source.info.num_test, source.info.num_test)
    ptq_config = config.export_config(config.model, output_dir / PTQ_DIR, test_images)
    ptq_config.validate()
    info = export.resolve_serving_info(model, config.model, ptq_config, source.info)
    calibration, images, labels = export.load_images(ptq_config, info, source)
    if output_dir.is_dir():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    write_json_atomic(output_dir / runs.CONFIG, config.to_dict())
    ptq = export.export_model(ptq_config)

    graph = FakeQuantGraph(model)
    history = fine_tune(graph, config, source, info, calibration)
    fake_quant_logits = _predict(graph, info.normalize(images))
    history[-1]["fake_quant_top1"] = float(np.mean(fake_quant_logits.argmax(-1) == labels))
    graph.restore()
    qat_model = output_dir / QAT_MODEL
    model.save(qat_model)
    beside = pathlib.Path(config.model).parent / runs.DATASET
    if beside.is_file():
        shutil.copyfile(beside, output_dir / runs.DATASET)
    qat = export.export_model(config.export_config(qat_model, output_dir / QAT_DIR, test_images))
    qat_int8 = tflite.tflite_logits(output_dir / QAT_DIR / tflite.TFLITE_FILES[INT8], images)

    report = _report(config, ptq, qat, fake_quant_logits, qat_int8, labels, len(calibration))
    report["history"] = history
    write_json_atomic(output_dir / "parity.json", report)
    return report


def training_seed(config):
    """`config.seed`, else the seed of the run that wrote the model, else 0."""
    if config.seed is not None:
        return config.seed
    beside = pathlib.Path(config.model).parent / runs.CONFIG
    try:
        run = json.loads(beside.read_text()) if beside.is_file() else {}
    except json.JSONDecodeError as error:
        raise UserInputError(f"{str(beside)!r} is not a run's config.json ({error}).") from error
    seed = run.get("seed", 0) if isinstance(run, dict) else 0
    return seed if isinstance(seed, int) else 0


def fine_tune(graph, config, source, info, calibration):
    """`config.epochs` of SGD through the fake-quant graph; ranges re-measured on the
    calibration images before each epoch and after the last. Returns per-epoch rows."""
    train_x, train_y = source.numpy("train", limit=config.train_images)
    train_x = info.normalize(train_x).numpy()
    calibration = info.normalize(calibration).numpy()
    variables = graph.model.trainable_variables
    optimizer = keras.optimizers.SGD(config.learning_rate, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, graph(x))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    rng = np.random.default_rng(config.seed)
    history = []
    for epoch in range(config.epochs):
        start = time.time()
        graph.calibrate(calibration)
        order = rng.permutation(len(train_x))
        losses = [
            float(step(train_x[batch], train_y[batch]))
            for batch in np.array_split(order, max(1, len(order) // config.batch_size))
        ]
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.time() - start}
        history.append(row)
        logging.info("QAT epoch %d/%d: loss %.4f", epoch + 1, config.epochs, row["loss"])
    graph.calibrate(calibration)
    return history


def _predict(graph, images, batch_size=64):
    call = tf.function(graph, reduce_retracing=True)
    return np.concatenate(
        [call(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
    )


def _report(config, ptq, qat, fake_quant_logits, qat_int8, labels, calibration_images):
    def top1(logits):
        return float(np.mean(np.asarray(logits).argmax(-1) == labels))

    difference = np.abs(fake_quant_logits - qat_int8)
    return {
        "images": {"source": f"{config.dataset}:test", "count": len(labels)},
        "top1": {
            "fp32": ptq["artifacts"]["keras"]["accuracy"],
            "ptq_int8": ptq["artifacts"][INT8]["accuracy"],
            "qat_fp32": qat["artifacts"]["keras"]["accuracy"],
            "qat_int8": qat["artifacts"][INT8]["accuracy"],
            "qat_fake_quant": top1(fake_quant_logits),
        },
        "qat_fake_quant_vs_int8": {
            "max_abs_logit_diff": float(difference.max()),
            "mean_abs_logit_diff": float(difference.mean()),
            "top1_agreement": float(np.mean(fake_quant_logits.argmax(-1) == qat_int8.argmax(-1))),
        },
        "artifacts": {
            "fp32": config.model,
            "ptq_int8": f"{PTQ_DIR}/{tflite.TFLITE_FILES[INT8]}",
            "qat_model": QAT_MODEL,
            "qat_int8": f"{QAT_DIR}/{tflite.TFLITE_FILES[INT8]}",
        },
        "settings": {
            "seed": config.seed,
            "epochs": config.epochs,
            "learning_rate": config.learning_rate,
            "batch_size": config.batch_size,
            "optimizer": "SGD, momentum 0.9, constant learning rate",
            "calibration_images": calibration_images,
            "int8_conversion": "post-training calibration of the fine-tuned float weights",
        },
    }


def format_report(report):
    """The top-1 rows as text."""
    lines = [f"{'model':<16}{'top-1':>8}  ({report['images']['count']} test images)"]
    lines += [f"{name:<16}{value:8.2%}" for name, value in report["top1"].items()]
    agreement = report["qat_fake_quant_vs_int8"]
    lines.append(
        f"fake-quant Keras vs QAT int8: mean |dlogit| {agreement['mean_abs_logit_diff']:.3e}, "
        f"top-1 agreement {agreement['top1_agreement']:.2%}"
    )
    return "\n".join(lines)
