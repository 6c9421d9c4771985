"""Evaluation of a trained model: top-1, top-5, parameters, GMACs and images per second.

A model saved by `training.train` (`model.keras`) takes images normalised with its training
data's mean and std, which `dataset.json` next to it records; evaluation uses them, and the
training run's seed (from `config.json`) so that `digits` and folder datasets split the same
way. Without those files the dataset's own statistics and seed 0 are used.

Example:
```python
results = evaluate_file(EvaluateConfig(model="runs/digits/model.keras", dataset="digits"))
```
"""

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf

from pibconv_tf import data, runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import complexity, networks, saving


@dataclasses.dataclass
class EvaluateConfig:
    """What `evaluate_file` evaluates.

    Args:
        model: path of a `.keras` model (logits, or a dict with "logits").
        dataset, data_dir: the data (see `data.load_source`).
        image_size: None takes the model's input size; a different value is refused.
        seed: None takes the training run's seed (`config.json` next to the model) or 0.
        split: "test" or "train".
        batch_size: images per forward pass.
        output: optional path of the JSON results.
        jit_compile: compile the forward pass with XLA.
    """

    model: str
    dataset: str = "cifar10"
    data_dir: str | None = None
    image_size: int | None = None
    seed: int | None = None
    split: str = "test"
    batch_size: int = 256
    output: str | None = None
    jit_compile: bool = False


def load_model(path):
    """Loads a `.keras` model (`model.saving.load_model`: one sentence for a bad file)."""
    return saving.load_model(path)


def logits_model(model):
    """`model` itself, or its logits-only view if it also outputs auxiliary logits."""
    return networks.inference_model(model)


def check_compatible(model, info, path="the model"):
    """Refuses a model whose input shape or number of classes does not fit `info`."""
    shape = tuple(model.input_shape)
    expected = (info.image_size, info.image_size, info.channels)
    if len(shape) != 4 or shape[1:] != expected:
        raise UserInputError(
            f"Model {path!r} takes inputs of shape {shape[1:]}, but dataset {info.name!r} "
            f"gives {expected}; pass --image_size={shape[1]} or the model's dataset."
        )
    classes = logits_model(model).output_shape[-1]
    if classes != info.num_classes:
        raise UserInputError(
            f"Model {path!r} has {classes} classes, but dataset {info.name!r} has "
            f"{info.num_classes}; evaluate it on the dataset it was trained on."
        )


def evaluate(model, source, split="test", batch_size=256, jit_compile=False):
    """Top-1/top-5 accuracy, mean cross-entropy and images per second on a split.

    The forward pass first runs untimed on the first batch (tracing), then timed on every
    batch; images per second counts only the forward passes, not the input pipeline.

    Returns:
        {"top1", "top5", "loss", "num_images", "images_per_second", "seconds"}; top-5 is
        top-min(5, classes).
    """
    model = logits_model(model)
    forward = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile)
    batches = data.eval_pipeline(source, batch_size, split)
    for images, _ in batches.take(1):
        forward(images).numpy()
    top1 = top5 = 0
    loss, seconds, count = 0.0, 0.0, 0
    for images, labels in batches:
        start = time.perf_counter()
        logits = forward(images).numpy().astype(np.float64)
        seconds += time.perf_counter() - start
        labels = labels.numpy()
        hit1, hit5 = topk_hits(logits, labels)
        top1, top5, count = top1 + hit1, top5 + hit5, count + len(labels)
        loss += float(np.sum(cross_entropy(logits, labels)))
    if count == 0:
        raise UserInputError(f"The {split} split of {source.info.name!r} has no images.")
    return {
        "top1": top1 / count,
        "top5": top5 / count,
        "loss": loss / count,
        "num_images": count,
        "images_per_second": count / max(seconds, 1e-9),
        "seconds": seconds,
    }


def topk_hits(logits, labels, k=5):
    """(top-1 hits, top-min(k, classes) hits): a label counts when no more than k - 1
    classes score strictly higher (ties count as hits, as `keras.ops.in_top_k`)."""
    k = min(k, logits.shape[-1])
    label_scores = logits[np.arange(len(labels)), labels]
    higher = np.sum(logits > label_scores[:, None], axis=1)
    return int(np.sum(higher < 1)), int(np.sum(higher < k))


def cross_entropy(logits, labels):
    """Per-image softmax cross-entropy, in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), labels]


def _side_file(model_path, name):
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), name)
    if not os.path.isfile(path):
        return None
    with open(path) as stream:
        return json.load(stream)


def load_matching_source(config, model):
    """The evaluation data, with the training run's seed and normalisation when known."""
    model_size = model.input_shape[1]
    image_size = config.image_size or model_size
    run = _side_file(config.model, runs.CONFIG) or {}
    seed = config.seed if config.seed is not None else run.get("seed", 0)
    source = data.load_source(config.dataset, config.data_dir, image_size, seed)
    trained = _side_file(config.model, runs.DATASET)
    if trained and trained.get("mean") and trained.get("std"):
        source.info = dataclasses.replace(
            source.info, mean=tuple(trained["mean"]), std=tuple(trained["std"])
        )
    return source, seed, bool(trained)


def evaluate_file(config):
    """Loads `config.model`, checks it against the data, evaluates it and writes the JSON.

    Returns:
        The results: model, dataset, split, seed, top1, top5, loss, num_images, params,
        gmacs, images_per_second, and where the normalisation came from.
    """
    if config.split not in data.SPLITS:
        raise UserInputError(f"--split {config.split!r} is unknown; expected train or test.")
    model = load_model(config.model)
    source, seed, from_run = load_matching_source(config, model)
    check_compatible(model, source.info, config.model)
    results = evaluate(model, source, config.split, config.batch_size, config.jit_compile)
    counts = complexity.model_complexity(logits_model(model))
    results = {
        "model": config.model,
        "dataset": source.info.name,
        "split": config.split,
        "seed": seed,
        "image_size": source.info.image_size,
        "normalization": runs.DATASET if from_run else "dataset statistics",
        **results,
        "params": counts["params"],
        "gmacs": counts["gmacs"],
    }
    if config.output:
        os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
        with open(config.output, "w") as stream:
            json.dump(results, stream, indent=2, sort_keys=True)
            stream.write("\n")
    return results
