"""The measurements of `benchmarks.harness`, run inside its worker processes.

Each measurement takes a spec {"what", "params", "workdir"} and returns a list of records
{"what", "config", "status", figures...}; `benchmark.finish_record` adds the common keys.
The search and train steps are timed by their owners' functions
(`search.benchmark.benchmark_search_step`, `train_benchmark.benchmark_train_step`), so the
harness reports what those report.
"""

import os
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks import harness
from benchmarks import train_step as train_benchmark
from pibconv_tf import data, distribute
from pibconv_tf.deploy import export, tflite
from pibconv_tf.deploy.latency import time_calls
from pibconv_tf.model import genotypes, networks, pib_conv

SYNTHETIC = "synthetic"
CALIBRATION_IMAGES = 100
_SYNTHETIC_STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def _gpu_memory():
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return None
    return tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2**20


def _has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


def _record(what, params, timing, batch_size, latency, **extra):
    return {
        "what": what,
        "config": params,
        **harness.timing_figures(timing, batch_size, latency),
        "peak_gpu_mb": _gpu_memory(),
        "accelerator": "GPU" if _has_gpu() else "CPU",
        **extra,
    }


def search_step(spec):
    """First- or second-order search step of the search network, training images/s."""
    from benchmarks.search_step import benchmark_search_step  # noqa: PLC0415

    p = spec["params"]
    stats = benchmark_search_step(
        p["order"],
        p["batch_size"],
        p["layers"],
        p["init_channels"],
        p["search_space"],
        steps=p["repeats"],
        warmup=p["warmup"] - 1,  # the harness' warm-up counts the first (tracing) step
        jit_compile=p["jit_compile"],
        nodes=p["nodes"],
        image_size=p["image_size"],
        implementation=p["implementation"],
        seed=p["seed"],
        inline_traces=p.get("inline_traces", False),
        recompute=p.get("recompute"),
        partial_channels=p.get("partial_channels", 1),
    )
    # What ran (an unset recompute resolves to on with TensorFlow, off on JAX).
    ran = {**p, "inline_traces": stats["inline_traces"], "recompute": stats["recompute"]}
    record = _step_record(
        "search_step",
        ran,
        stats,
        trace_seconds=stats["trace_seconds"],
        resident_mb_after=stats["resident_mb_after"],
    )
    return [record]


def train_step(spec):
    """One training step of the derived network (auxiliary head, drop path, TorchSGD)."""
    p = spec["params"]
    mixed = None if p["precision"] == "float32" else p["precision"]
    if mixed == "mixed_float16" and not _has_gpu():
        reason = "mixed_float16 needs a GPU; on a CPU it only adds casts (float16 has no fast path)"
        return [{"what": "train_step", "config": p, "status": "skipped", "reason": reason}]
    stats = train_benchmark.benchmark_train_step(
        p["genotype"],
        p["layers"],
        init_channels=p["init_channels"],
        batch_size=p["batch_size"],
        steps=p["repeats"],
        warmup=p["warmup"],
        jit_compile=p["jit_compile"],
        mixed_precision=mixed,
        image_size=p["image_size"],
        num_classes=p["num_classes"],
        implementation=p["implementation"],
        seed=p["seed"],
    )
    record = _step_record("train_step", p, stats)
    record["cpu_ms_per_call"] = {"median": 1e3 * stats["cpu_seconds_per_step"]}
    return [record]


def _step_record(what, p, stats, **extra):
    """The record of a search or train step measured by its owner's benchmark function."""
    timing = {"seconds": stats["step_seconds"], "first_call_seconds": stats["first_step_seconds"]}
    return _record(
        what,
        p,
        timing,
        p["batch_size"],
        latency=False,
        parameters=stats["params"],
        device=stats["device"],
        **extra,
    )


def _network(p):
    """The logits-only network to time: `p["model"]` loaded, or a fresh `network_cifar`."""
    if p.get("model"):
        model = export.load_inference_model(p["model"], p["implementation"])
        p["layers"] = sum(1 for layer in model.layers if layer.name.startswith("cell_"))
        p["image_size"] = int(model.input.shape[1])
        return model
    keras.utils.set_random_seed(p["seed"])
    model = networks.network_cifar(
        genotypes.load_genotype(p["genotype"]),
        num_classes=p["num_classes"],
        init_channels=p["init_channels"],
        layers=p["layers"],
        image_size=p["image_size"],
    )
    pib_conv.set_implementation(model, p["implementation"])
    return model


def _serving_info(image_size, num_classes, source=None):
    if source is not None:
        info = source.info
        return export.ServingInfo(image_size, info.mean, info.std, info.class_names, "dataset")
    names = tuple(str(i) for i in range(num_classes))
    return export.ServingInfo(image_size, **_SYNTHETIC_STATS, class_names=names, source=SYNTHETIC)


def inference(spec):
    """Keras call in a tf.function, predict_on_batch and the SavedModel, per batch size."""
    p = spec["params"]
    model = _network(p)
    size = p["image_size"]
    callers = {}
    if "keras_call" in p["modes"]:
        forward = tf.function(lambda x: model(x, training=False))
        callers["keras_call"] = lambda x, pixels: forward(x).numpy()
    if "predict_on_batch" in p["modes"]:
        callers["predict_on_batch"] = lambda x, pixels: model.predict_on_batch(x)
    if "saved_model" in p["modes"]:
        directory = os.path.join(spec["workdir"], "saved_model")
        info = _serving_info(size, int(model.output.shape[-1]))
        export.write_saved_model(model, info, directory, uint8_signature=False)
        serve = tf.saved_model.load(directory).signatures[tflite.SIGNATURE]
        callers["saved_model"] = lambda x, pixels: serve(images=pixels)[tflite.LOGITS].numpy()
    rng = np.random.default_rng(p["seed"])
    records = []
    for mode, caller in callers.items():
        for batch in p["batch_sizes"]:
            x = tf.constant(rng.normal(size=(batch, size, size, 3)), tf.float32)
            pixels = tf.constant(rng.integers(0, 256, (batch, size, size, 3)), tf.float32)
            timing = time_calls(
                lambda caller=caller, x=x, pixels=pixels: caller(x, pixels),
                p["repeats"],
                p["warmup"],
                p["min_repeat_seconds"],
            )
            config = {**_without(p, "batch_sizes", "modes"), "mode": mode, "batch_size": batch}
            records.append(_record("inference", config, timing, batch, True, device=_device()))
    return records


def tflite_conversion(spec):
    """Converts the network to each TFLite format and returns the timing specs to run.

    The conversion process also scores every format's top-1 agreement with fp32 (and
    accuracy, on a dataset) on `eval_images` images; each timing process then times one
    format at one thread count with LiteRT alone.
    """
    p = spec["params"]
    model = _network(p)
    path = p.get("model")
    if not path:
        path = os.path.join(spec["workdir"], "model.keras")
        model.save(path)
    source = _source(p) if p.get("dataset") else None
    info = _serving_info(p["image_size"], int(model.output.shape[-1]), source)
    calibration, images, labels = _tflite_images(p, source)
    config = export.ExportConfig(
        model=path,
        output_dir=spec["workdir"],
        formats=tuple(p["formats"]),
        pib_implementation=p["tflite_implementation"],
    )
    artifacts, seconds = {}, {}
    start = time.perf_counter()
    for fmt, content in export.build_tflite(config, info, p["formats"], calibration):
        seconds[fmt] = time.perf_counter() - start
        artifacts[fmt] = os.path.join(spec["workdir"], tflite.TFLITE_FILES[fmt])
        pathlib.Path(artifacts[fmt]).write_bytes(content)
        start = time.perf_counter()
    scores = _scores(artifacts, images, labels)
    timings = [
        {
            "what": "tflite_timing",
            "workdir": spec["workdir"],
            "params": {
                **_without(p, "formats", "threads"),
                "format": fmt,
                "threads": threads,
                "batch_size": 1,
                "path": file,
                "bytes": os.path.getsize(file),
                "convert_seconds": seconds[fmt],
                **scores.get(fmt, {}),
            },
        }
        for fmt, file in artifacts.items()
        for threads in p["threads"]
    ]
    return [{"what": "tflite", "config": p, "tflite_artifacts": artifacts, "timings": timings}]


def _tflite_images(p, source):
    """(calibration pixels, evaluation pixels, labels or None), uint8."""
    size = p["image_size"]
    if source is not None:
        calibration, _ = source.numpy("train", limit=CALIBRATION_IMAGES)
        images, labels = source.numpy("test", limit=p["eval_images"])
        return calibration, images, labels
    rng = np.random.default_rng(p["seed"])
    calibration = rng.integers(0, 256, (CALIBRATION_IMAGES, size, size, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (p["eval_images"], size, size, 3), dtype=np.uint8)
    return calibration, images, None


def _scores(artifacts, images, labels):
    if not len(images) or "tflite_fp32" not in artifacts:
        return {}
    predictions = {
        fmt: np.argmax(tflite.tflite_logits(path, images), axis=-1)
        for fmt, path in artifacts.items()
    }
    scores = {}
    for fmt, predicted in predictions.items():
        scores[fmt] = {
            "top1_agreement_with_fp32": float(np.mean(predicted == predictions["tflite_fp32"])),
            "eval_images": len(images),
        }
        if labels is not None:
            scores[fmt]["accuracy"] = float(np.mean(predicted == labels))
    return scores


def pipeline(spec):
    """One epoch of `data.train_pipeline` or `data.search_pipeline`, in images/s.

    Search batches hold a training and a validation half; the images counted are the
    training half, as a search step's images/s counts them.
    """
    p = spec["params"]
    source = _source(p)
    if p["pipeline"] == "train":
        batch = p["batch_size"]
        dataset = data.train_pipeline(source, batch, seed=p["seed"])
        steps = source.info.num_train // batch
    else:
        batch = p["search_batch_size"]
        dataset, steps = data.search_pipeline(source, batch, seed=p["seed"])

    def epoch():
        for _ in dataset:
            pass

    timing = time_calls(epoch, p["repeats"], p["warmup"])
    config = {**p, "batch_size": batch, "source": source.info.name}
    return [
        _record(
            "pipeline",
            config,
            timing,
            steps * batch,
            latency=False,
            batches_per_epoch=steps,
            images_per_epoch=steps * batch,
            device=_device(),
        )
    ]


def _source(p):
    if p.get("dataset"):
        return data.load_source(p["dataset"], p.get("data_dir"), p["image_size"], p["seed"])
    size, count, classes = p["image_size"], p["pipeline_images"], p["num_classes"]
    rng = np.random.default_rng(p["seed"])
    test = max(count // 5, 1)
    images = rng.integers(0, 256, (count + test, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, count + test).astype(np.int32)
    return data.array_source(
        SYNTHETIC,
        (images[:count], labels[:count]),
        (images[count:], labels[count:]),
        [str(i) for i in range(classes)],
    )


def _without(params, *names):
    return {k: v for k, v in params.items() if k not in names}


def _device():
    return distribute.device_description()


MEASURES = {
    "search_step": search_step,
    "train_step": train_step,
    "inference": inference,
    "tflite": tflite_conversion,
    "pipeline": pipeline,
}
