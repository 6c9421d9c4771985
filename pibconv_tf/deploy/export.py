"""Deployment: a trained `model.keras` as a SavedModel and TFLite models, with parity checks.

The trained model expects normalised images. The exported models take raw pixels
[N, H, W, 3] (0..255) and normalise inside, `(x / 255 - mean) / std` with the training
statistics, so a device feeds camera pixels as they are; they return `logits` and
`probabilities`. `export_model` writes, into one directory:

    saved_model/              signatures serving_default (float32) and serving_uint8
    model_fp32.tflite         } the formats asked for (`FORMATS`), TFLite built-ins only,
    model_fp16.tflite         } batch size fixed (1 by default)
    model_dynamic_int8.tflite }
    model_int8.tflite         }
    model_int8_mixed.tflite   }
    labels.txt                one class name per line
    metadata.json             genotype, size, normalisation, classes, files, versions
    parity.json               each artifact against Keras on the same images
    device_report.json, .md   per TFLite model: operators with their XNNPACK and TFLite
                              Micro status, arena estimate, size, 1/2/4-thread latency
    config.json               the resolved export configuration

Example:
```python
config = ExportConfig(model="runs/train/model.keras", output_dir="runs/export",
                      dataset="digits")
report = export_model(config)
```
"""

import dataclasses
import hashlib
import json
import pathlib
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import pibconv_tf
from pibconv_tf import data, runs
from pibconv_tf.deploy import device_report, microcontroller, tflite
from pibconv_tf.errors import RunError, UserInputError
from pibconv_tf.model import networks, pib_conv, saving
from pibconv_tf.model.cells import Cell
from pibconv_tf.runs import write_json_atomic, write_text_atomic

SAVED_MODEL = "saved_model"
# What --formats writes by default; `tflite_int8_c` (the int8 model as C source for
# microcontrollers, `microcontroller.py`) on request.
DEFAULT_FORMATS = (SAVED_MODEL, *tflite.TFLITE_FORMATS)
FORMATS = (*DEFAULT_FORMATS, microcontroller.C_ARRAY)
# Formats that need calibration images (the C array is the calibrated int8 model).
CALIBRATED = (*tflite.CALIBRATED_FORMATS, microcontroller.C_ARRAY)
# Measured (docs/export.md): the split form runs fastest under XNNPACK, in float and int8.
DEFAULT_PIB_IMPLEMENTATION = "split"
SERVING_UINT8 = "serving_uint8"
FP32_CHECKED = (SAVED_MODEL, f"{SAVED_MODEL}_uint8", "tflite_fp32")
_MINIMUMS = {
    "calibration_images": 1,
    "parity_images": 1,
    "tflite_batch_size": 1,
    "benchmark_runs": 0,
    "benchmark_warmup": 0,
    "benchmark_rounds": 1,
    "device_report_runs": 0,
}
_CHOICES = {
    "int8_io_type": tflite.INT8_IO_TYPES,
    "pib_implementation": tflite.PIB_IMPLEMENTATIONS,
}


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What `export_model` does; the fields mirror `apps.export`'s flags.

    Attributes:
        model: path of the logits-only `model.keras` written by training.
        output_dir: directory receiving the artifacts.
        formats: subset of `FORMATS`.
        dataset: `data.load_source` name for calibration and parity (None: parity on random
            pixels, no accuracy, no int8 formats).
        data_dir, seed: passed to `data.load_source`.
        image_size: expected input size (None: the model's).
        mean, std, class_names: normalisation (0..1 scale) and class names, overriding
            `dataset.json` next to the model, which overrides the dataset's own values.
        calibration_images: train images calibrating `tflite_int8` and `tflite_int8_mixed`.
        parity_images: test images of the parity report.
        int8_io: integer input and output for `tflite_int8` and `tflite_int8_mixed` (else
            float32).
        int8_io_type: "uint8" or "int8".
        pib_implementation: PIBConv's grouped convolution in the TFLite graph: "split"
            (`export_tflite.SplitPIBConv`), "depthwise" or "grouped" (PIBConv's own forms);
            the numbers are the same.
        tflite_batch_size: the TFLite models' fixed batch size.
        fp32_tolerance: max |logit difference| allowed for SavedModel and `tflite_fp32`.
        benchmark_runs: time each TFLite model (per thread count) and Keras at batch 1 over
            this many runs after `benchmark_warmup`, into `latency.json` (0: skip).
        benchmark_threads: LiteRT thread counts to time.
        benchmark_rounds: time the models in turn this many times and keep each one's
            fastest round (robust to a shared machine's varying load).
        device_report_runs: timed runs per thread count of the latency table in
            `device_report.json` / `.md` (0: the report without latency).
        device_report_threads: LiteRT thread counts of that table.
        overwrite: replace a non-empty `output_dir`.
    """

    model: str
    output_dir: str
    formats: tuple[str, ...] = DEFAULT_FORMATS
    dataset: str | None = None
    data_dir: str | None = None
    seed: int = 0
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    calibration_images: int = 300
    parity_images: int = 200
    int8_io: bool = True
    int8_io_type: str = "uint8"
    pib_implementation: str = DEFAULT_PIB_IMPLEMENTATION
    tflite_batch_size: int = 1
    fp32_tolerance: float = 1e-4
    benchmark_runs: int = 0
    benchmark_warmup: int = 10
    benchmark_threads: tuple[int, ...] = (1, 2)
    benchmark_rounds: int = 1
    device_report_runs: int = 50
    device_report_threads: tuple[int, ...] = device_report.DEFAULT_THREADS
    overwrite: bool = False

    def validate(self):
        """Raises UserInputError naming the first bad field; touches no file."""
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise UserInputError(
                f"--formats {','.join(self.formats)!r} holds unknown or no formats "
                f"{unknown}; accepted are {', '.join(FORMATS)}."
            )
        if (self.mean is None) != (self.std is None):
            raise UserInputError("--mean and --std go together; pass both or neither.")
        for name, minimum in _MINIMUMS.items():
            if getattr(self, name) < minimum:
                raise UserInputError(f"--{name} must be >= {minimum}, got {getattr(self, name)}.")
        for name, accepted in _CHOICES.items():
            if getattr(self, name) not in accepted:
                raise UserInputError(
                    f"--{name} {getattr(self, name)!r} is unknown; accepted are "
                    f"{', '.join(accepted)}."
                )
        for name in ("benchmark_threads", "device_report_threads"):
            threads = getattr(self, name)
            if not threads or min(threads) < 1:
                raise UserInputError(f"--{name} must be >= 1, got {list(threads)}.")
        if not self.fp32_tolerance > 0:
            raise UserInputError(f"--fp32_tolerance must be > 0, got {self.fp32_tolerance}.")
        calibrated = [f for f in self.formats if f in CALIBRATED]
        if calibrated and not self.dataset:
            raise UserInputError(
                f"Formats {', '.join(calibrated)} need calibration images: pass --dataset "
                "(its train split calibrates), or leave them out of --formats."
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) != 3:
                raise UserInputError(f"--{name} needs 3 values (R, G, B), got {list(values)}.")
        if self.std is not None and min(self.std) <= 0:
            raise UserInputError(f"--std values must be > 0, got {list(self.std)}.")

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ServingInfo:
    """What the serving wrapper needs: the input size, normalisation and class names.

    Attributes:
        image_size: H = W of the input.
        mean, std: per-channel statistics of the training images, 0..1 scale.
        class_names: one per logit.
        source: where mean and std came from ("flags", "dataset.json" or "dataset").
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    source: str

    def normalize(self, images):
        """(x / 255 - mean) / std in float32, exactly as `data.normalize`."""
        scale = tf.constant([1.0 / (255.0 * s) for s in self.std], tf.float32)
        shift = tf.constant([m / s for m, s in zip(self.mean, self.std, strict=True)])
        return tf.cast(images, tf.float32) * scale - shift


def load_inference_model(path, implementation=None):
    """Loads a logits-only float32 `network_cifar` model from a `.keras` file.

    Args:
        path: the `.keras` file.
        implementation: switch every PIBConv to "depthwise" or "grouped" (None: keep).
    """
    path = pathlib.Path(path)
    model = networks.inference_model(saving.load_model(str(path)))
    shape = tuple(model.input.shape) if not isinstance(model.input, list | dict) else None
    if shape is None or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise UserInputError(
            f"--model {str(path)!r} must take one square [N, H, W, 3] image input, got {shape}."
        )
    if len(model.output.shape) != 2 or model.output.dtype != "float32":
        raise UserInputError(
            f"--model {str(path)!r} must output float32 logits [N, classes], got "
            f"{model.output.dtype} {tuple(model.output.shape)}."
        )
    if implementation is not None:
        pib_conv.set_implementation(model, implementation)
    return model


def resolve_serving_info(model, model_path, config, dataset_info=None):
    """Normalisation and class names: flags, else `dataset.json` next to the model, else
    the dataset's; raises UserInputError if none gives mean and std."""
    image_size = int(model.input.shape[1])
    num_classes = int(model.output.shape[-1])
    beside = pathlib.Path(model_path).parent / runs.DATASET
    saved = _read_dataset_json(beside) if beside.is_file() else None
    candidates = [("dataset.json", saved), ("dataset", dataset_info)]
    if config.mean is not None and config.std is not None:
        mean, std, source = config.mean, config.std, "flags"
    else:
        found = [(name, info) for name, info in candidates if info is not None]
        if not found:
            raise UserInputError(
                f"No normalisation for --model {model_path!r}: no {runs.DATASET} beside it; "
                "pass --mean and --std (0..1 scale) or --dataset."
            )
        source, info = found[0]
        mean, std = info.mean, info.std
    class_names = config.class_names
    if class_names is None:
        named = [info.class_names for _, info in candidates if info is not None]
        class_names = named[0] if named else tuple(str(i) for i in range(num_classes))
    if len(class_names) != num_classes:
        raise UserInputError(
            f"The model has {num_classes} classes but {len(class_names)} class names were "
            f"found ({list(class_names)[:5]}...); pass --class_names with {num_classes}."
        )
    info = ServingInfo(
        image_size, tuple(map(float, mean)), tuple(map(float, std)), tuple(class_names), source
    )
    return info


def _read_dataset_json(path):
    try:
        return data.DatasetInfo.from_json_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserInputError(
            f"{str(path)!r} is not a dataset.json written by training ({error!r})."
        ) from error


def serving_function(model, info):
    """images (float32 or uint8 raw pixels) -> {"logits", "probabilities"}."""

    def serve(images):
        logits = model(info.normalize(images), training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    return serve


def write_saved_model(model, info, directory, batch_size=None, uint8_signature=True):
    """Writes a SavedModel whose `serving_default` takes float32 raw pixels [B, H, W, 3].

    `serving_uint8` takes uint8 pixels. Keras' ExportArchive tracks the variables so that
    the TFLite converter freezes them (and folds BatchNorm); a plain `tf.Module` around a
    Keras 3 model leaves resource variables in the TFLite graph.
    """
    size = info.image_size
    serve = serving_function(model, info)
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec([batch_size, size, size, 3], tf.float32, name=tflite.INPUT)
    archive.add_endpoint(tflite.SIGNATURE, serve, [spec])
    if uint8_signature:
        spec = tf.TensorSpec([batch_size, size, size, 3], tf.uint8, name=tflite.INPUT)
        archive.add_endpoint(SERVING_UINT8, serve, [spec])
    archive.write_out(str(directory), verbose=False)


def build_tflite(config, info, formats, calibration=None):
    """Converts fresh copies of `config.model` to each TFLite format; yields (fmt, bytes).

    The copies are traced with `config.pib_implementation` and a fixed batch; for the
    calibrated formats the stride-2 max pools take their quantizable form. Float formats
    share one conversion SavedModel, calibrated ones another. The copies' weights may be
    permuted: they are never saved.
    """
    io_type = config.int8_io_type if config.int8_io else None
    batch = config.tflite_batch_size
    with tempfile.TemporaryDirectory() as root:
        directories = {}
        for fmt in formats:
            integer = fmt in tflite.CALIBRATED_FORMATS
            if integer not in directories:
                model = load_inference_model(config.model)
                tflite.set_pib_implementation(model, config.pib_implementation)
                if integer:
                    tflite.make_pools_quantizable(model)
                directories[integer] = pathlib.Path(root) / f"{len(directories)}"
                write_saved_model(model, info, directories[integer], batch, uint8_signature=False)
            yield fmt, tflite.convert(directories[integer], fmt, calibration, io_type, batch)


def prepare_output_dir(path, overwrite, protect=()):
    """Creates `path`, refusing a non-empty one without `overwrite` (nothing is touched)."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"--output_dir {str(path)!r} exists and is not a directory.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserInputError(
                f"--output_dir {str(path)!r} is not empty; pass --overwrite to replace it."
            )
        for kept in protect:
            if path.resolve() in pathlib.Path(kept).resolve().parents:
                raise UserInputError(
                    f"--output_dir {str(path)!r} holds the input {str(kept)!r}; --overwrite "
                    "would delete it, choose another directory."
                )
    return path


def _clear(path):
    if path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def load_images(config, info, source):
    """(calibration uint8 images or None, parity images, parity labels or None)."""
    rng = np.random.default_rng(config.seed)
    if source is None:
        shape = (config.parity_images, info.image_size, info.image_size, 3)
        return None, rng.integers(0, 256, shape).astype(np.uint8), None
    images, labels = source.numpy("test", limit=config.parity_images)
    calibration = None
    if any(fmt in tflite.CALIBRATED_FORMATS for fmt in config.formats):
        count = min(config.calibration_images, source.info.num_train)
        indices = np.sort(rng.choice(source.info.num_train, count, replace=False))
        batches = source.subset("train", indices).batch(256).as_numpy_iterator()
        calibration = np.concatenate([x for x, _ in batches])
    return calibration, images, labels


def model_description(model, path):
    """Genotype, layers, init_channels and parameter count of a `network_cifar` model."""
    cells = [layer for layer in model.layers if isinstance(layer, Cell)]
    description = {
        "file": str(path),
        "sha256": hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest(),
        "num_classes": int(model.output.shape[-1]),
        "params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
    }
    if cells:
        description.update(
            genotype=cells[0].genotype.to_dict(),
            layers=len(cells),
            init_channels=networks.stem_channels(model) // networks.STEM_MULTIPLIER,
        )
    return description


def directory_bytes(path):
    path = pathlib.Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_model(config):
    """Writes the artifacts of `config.formats`, the labels, metadata and parity report.

    Returns:
        The parity report (also `parity.json`), with the `device_report` under
        "device_report", and the `benchmark_artifacts` rows under "latency" when
        `config.benchmark_runs` > 0.

    Raises:
        UserInputError: bad config, model, dataset or output directory, before any file
            is written.
        RunError: SavedModel or float32 TFLite outputs differ from Keras by more than
            `config.fp32_tolerance` (the artifacts and `parity.json` stay for inspection),
            or a TFLite model needs non-built-in operations.
    """
    config.validate()
    output_dir = prepare_output_dir(config.output_dir, config.overwrite, protect=[config.model])
    model = load_inference_model(config.model)
    size = int(model.input.shape[1])
    if config.image_size is not None and config.image_size != size:
        raise UserInputError(
            f"--image_size {config.image_size} differs from the model's input size {size}."
        )
    source = None
    if config.dataset:
        source = data.load_source(config.dataset, config.data_dir, size, config.seed)
    info = resolve_serving_info(model, config.model, config, source and source.info)
    calibration, images, labels = load_images(config, info, source)
    _clear(output_dir)
    write_json_atomic(output_dir / runs.CONFIG, config.to_dict())
    write_text_atomic(output_dir / "labels.txt", "".join(f"{n}\n" for n in info.class_names))
    artifacts, outputs = _write_artifacts(config, info, calibration, images, output_dir)
    keras_logits = model.predict(info.normalize(images), batch_size=64, verbose=0)
    report = tflite.parity_report(
        keras_logits, outputs, labels, config.fp32_tolerance, FP32_CHECKED
    )
    report["images"] = {
        "source": f"{config.dataset}:test" if source else "random",
        "count": len(images),
    }
    write_json_atomic(output_dir / "parity.json", report)
    metadata = _metadata(config, info, model, artifacts, calibration, output_dir)
    write_json_atomic(output_dir / "metadata.json", metadata)
    try:
        tflite.check_parity(report)
    except RunError:
        logging.error("Parity:\n%s", tflite.format_parity(report))
        raise
    report["device_report"] = write_device_report(config, artifacts, output_dir)
    if config.benchmark_runs:
        report["latency"] = benchmark_artifacts(config, model, artifacts, output_dir)
    return report


def write_device_report(config, artifacts, output_dir):
    """`device_report.device_report` of every TFLite artifact, into `output_dir`."""
    paths = {
        fmt: output_dir / artifact["path"]
        for fmt, artifact in artifacts.items()
        if fmt in tflite.TFLITE_FORMATS
    }
    return device_report.device_report(
        paths, output_dir, config.device_report_threads, config.device_report_runs
    )


def benchmark_artifacts(config, model, artifacts, output_dir):
    """Batch latency of each TFLite artifact per thread count, and of Keras, into
    `latency.json`; returns the rows."""
    paths = {
        fmt: output_dir / artifact["path"]
        for fmt, artifact in artifacts.items()
        if fmt in tflite.TFLITE_FORMATS
    }
    timing = (config.benchmark_warmup, config.benchmark_runs)
    rows = tflite.benchmark_models(
        paths, config.benchmark_threads, *timing, config.benchmark_rounds
    )
    keras_runs = [tflite.benchmark_keras(model, *timing) for _ in range(config.benchmark_rounds)]
    stats = min(keras_runs, key=lambda row: row["median_ms"])
    rows.append({"artifact": "keras (tf.function)", "threads": None, **stats})
    write_json_atomic(output_dir / "latency.json", rows)
    return rows


def _write_artifacts(config, info, calibration, images, output_dir):
    """Writes each format; returns ({fmt: metadata}, {artifact name: logits on images})."""
    artifacts, outputs = {}, {}
    start = time.time()
    if SAVED_MODEL in config.formats:
        path = output_dir / SAVED_MODEL
        write_saved_model(load_inference_model(config.model, "depthwise"), info, path)
        outputs.update(_saved_model_logits(path, images))
        artifacts[SAVED_MODEL] = {
            "path": SAVED_MODEL,
            "signatures": [tflite.SIGNATURE, SERVING_UINT8],
            "pib_implementation": "depthwise",
            "bytes": directory_bytes(path),
        }
        logging.info("Wrote %s in %.1f s.", path, time.time() - start)
    formats = [fmt for fmt in config.formats if fmt in tflite.TFLITE_FORMATS]
    c_array = microcontroller.C_ARRAY in config.formats
    if c_array and "tflite_int8" not in formats:
        formats.append("tflite_int8")  # the model the C array holds, written beside it
    for fmt, content in build_tflite(config, info, formats, calibration):
        path = output_dir / tflite.TFLITE_FILES[fmt]
        path.write_bytes(content)
        outputs[fmt] = tflite.tflite_logits(path, images)
        artifacts[fmt] = {
            "path": path.name,
            "bytes": len(content),
            **tflite.io_details(content),
            "ops": tflite.op_counts(content),
            "pib_implementation": config.pib_implementation,
        }
        logging.info("Wrote %s after %.1f s.", path, time.time() - start)
        if c_array and fmt == "tflite_int8":
            artifacts[microcontroller.C_ARRAY] = microcontroller.write_c_array(
                content, list(artifacts[fmt]["ops"]), output_dir, path.name
            )
            logging.info("Wrote %s and %s.", microcontroller.SOURCE, microcontroller.HEADER)
    return artifacts, outputs


def _saved_model_logits(path, images):
    loaded = tf.saved_model.load(str(path))
    results = {}
    for name, signature, dtype in (
        (SAVED_MODEL, tflite.SIGNATURE, np.float32),
        (f"{SAVED_MODEL}_uint8", SERVING_UINT8, np.uint8),
    ):
        function = loaded.signatures[signature]
        chunks = [
            function(images=tf.constant(images[i : i + 64].astype(dtype)))["logits"].numpy()
            for i in range(0, len(images), 64)
        ]
        results[name] = np.concatenate(chunks)
    return results


def _metadata(config, info, model, artifacts, calibration, output_dir):
    return {
        "model": model_description(model, config.model),
        "input": {
            "shape": [None, info.image_size, info.image_size, 3],
            "pixels": "raw RGB 0..255 (float32, or uint8 / quantized for integer inputs)",
        },
        "normalization": {
            "inside_model": True,
            "formula": "(x / 255 - mean) / std",
            "mean": list(info.mean),
            "std": list(info.std),
            "source": info.source,
        },
        "class_names": list(info.class_names),
        "outputs": ["logits", "probabilities"],
        "formats": list(config.formats),
        "artifacts": artifacts,
        "calibration": None
        if calibration is None
        else {"dataset": config.dataset, "split": "train", "images": len(calibration)},
        "labels": "labels.txt",
        "versions": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "pibconv_tf": pibconv_tf.__version__,
        },
    }
