"""GradCAM, GradCAM++ and ScoreCAM of trained networks, drawn as the paper's Fig. 5 grid.

The maps come from tf-keras-vis (`Gradcam`, `GradcamPlusPlus`, `Scorecam`), which runs on
Keras 3 models as they are, with one caveat: its default search for the "penultimate
convolution" walks back from the named layer to the last `Conv` layer *at the model's top
level*, which for a DARTS network is the stem. We therefore always name the target layer
(default: the last cell, `networks.last_cell_name`) and pass
`seek_penultimate_conv_layer=False`. The networks output logits, so no softmax has to be
replaced by a linear activation (ScoreCAM applies its own softmax to the logits).

Example:
```python
config = GradcamConfig(models=["runs/pibconv_l10/model.keras"], dataset="cifar10",
                       indices=[0, 1, 2, 3], output="gradcam.png")
summary = run_gradcam(config)  # writes gradcam.png, gradcam.npz, gradcam.config.json
```

Reference:
    Selvaraju et al., Grad-CAM, ICCV 2017; Ahmadian et al., arXiv 2301.01286 (Fig. 5).
"""

import dataclasses
import functools
import json
import os
import pathlib
import warnings

import keras
import matplotlib
import numpy as np
import tensorflow as tf
from absl import logging
from tf_keras_vis.gradcam import Gradcam
from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
from tf_keras_vis.scorecam import Scorecam
from tf_keras_vis.utils.scores import CategoricalScore

matplotlib.use("Agg")  # files only: never open a window
from matplotlib import colormaps  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from pibconv_tf import data, runs  # noqa: E402
from pibconv_tf.errors import UserInputError  # noqa: E402
from pibconv_tf.insight import plots  # noqa: E402
from pibconv_tf.model import networks, saving  # noqa: E402 (networks registers the layers)
from pibconv_tf.runs import write_json_atomic  # noqa: E402

METHODS = ("gradcam", "gradcam++", "scorecam")
TARGETS = ("predicted", "label")
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}
NO_LABEL = -1
FEATURES = "gradcam_target"


@dataclasses.dataclass
class Classifier:
    """A trained logits-only network with what is needed to feed it.

    Args:
        model: the loaded `keras.Model` (normalised images -> logits).
        path: the `.keras` file it came from.
        label: the row label of the figure.
        info: its `data.DatasetInfo` (from `dataset.json`), or None when there is none.
    """

    model: keras.Model
    path: str
    label: str
    info: data.DatasetInfo | None

    @property
    def image_size(self):
        return int(self.model.input_shape[1])


def model_path(spec):
    """The `.keras` file of `spec`: the file itself, or `model.keras` inside a run directory."""
    path = pathlib.Path(spec)
    if path.is_dir():
        path = path / runs.MODEL
    if not path.is_file() or path.suffix != ".keras":
        raise UserInputError(
            f"Model {spec!r} is neither a .keras file nor a directory holding {runs.MODEL}."
        )
    return path


def load_classifier(spec, label=None):
    """Loads a saved network and the `dataset.json` beside it (if any) as a `Classifier`."""
    path = model_path(spec)
    model = saving.load_model(str(path))
    if isinstance(model.output, dict):
        model = networks.inference_model(model)
    if len(model.inputs) != 1 or len(model.input_shape) != 4:
        raise UserInputError(f"Model {str(path)!r} does not take one batch of images.")
    info = None
    info_path = path.parent / runs.DATASET
    if info_path.is_file():
        try:
            info = data.DatasetInfo.from_json_dict(json.loads(info_path.read_text()))
        except (ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"{str(info_path)!r} is not a valid dataset.json.") from error
    if label is None:
        label = path.parent.name if path.name == runs.MODEL and path.parent.name else path.stem
    return Classifier(model, str(path), label, info)


def resolve_layer(model, layer=None):
    """The name of the layer whose output GradCAM weighs; default: the last DARTS cell."""
    if layer is None:
        try:
            return networks.last_cell_name(model)
        except ValueError as error:
            raise UserInputError(
                f"Model {model.name!r} has no DARTS cell; name the target layer with --layer."
            ) from error
    names = [candidate.name for candidate in model.layers]
    if layer not in names:
        raise UserInputError(
            f"Layer {layer!r} is not in model {model.name!r}; its layers are {', '.join(names)}."
        )
    shape = model.get_layer(layer).output.shape
    if len(shape) != 4:
        raise UserInputError(
            f"Layer {layer!r} outputs shape {tuple(shape)}; GradCAM needs a spatial "
            "[N, H, W, C] feature map (a cell or a convolution)."
        )
    return layer


def resize_images(images, size):
    """uint8 [N, h, w, 3] -> uint8 [N, size, size, 3] (bilinear, antialiased; no-op if equal)."""
    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
        return images.astype(np.uint8)
    resized = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def read_image_files(paths, size):
    """Decodes image files (PNG, JPEG, BMP, GIF) to uint8 RGB [N, size, size, 3]."""
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserInputError(f"Image file {path!r} does not exist.")
        try:
            image = tf.io.decode_image(
                tf.io.read_file(path), channels=3, expand_animations=False
            ).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
            raise UserInputError(
                f"Image file {path!r} cannot be decoded; accepted are PNG, JPEG, BMP and GIF."
            ) from error
        images.append(resize_images(image[None], size)[0])
    return np.stack(images)


def split_at(model, layer):
    """(features, head) models around `layer`, or None if the rest needs other tensors too.

    `head` maps the layer's output to the logits through an `Identity` layer named
    `FEATURES`, GradCAM's target. Only the head is then differentiated: tf-keras-vis' tape
    watches its input, so given the whole network it would backpropagate through every
    convolution before the layer (wasted work, and TF 2.21's oneDNN kernel for the filter
    gradient of a 1x1 stride-2 convolution corrupts memory for some small channel counts
    and odd batch sizes).
    """
    target = model.get_layer(layer).output
    try:
        rest = keras.Model(target, model.output)
    except ValueError:  # the rest of the network also reads tensors before `layer`
        return None
    features = keras.Model(model.input, target, name="features")
    inputs = keras.Input(tuple(target.shape[1:]), name="target_features")
    head = keras.Model(inputs, rest(keras.layers.Identity(name=FEATURES)(inputs)), name="head")
    return features, head


def _visualizer(method, model):
    if method == "scorecam":
        # ScoreCAM calls `model.predict` with Keras' default progress bar; give it a view of
        # the model (same layers and weights) whose predict is silent.
        view = keras.Model(model.inputs, model.outputs, name=f"{model.name}_view")
        view.predict = functools.partial(view.predict, verbose=0)
        return Scorecam(view, clone=False)
    classes = {"gradcam": Gradcam, "gradcam++": GradcamPlusPlus}
    return classes[method](model, clone=False)


def class_activation_maps(
    model, images, classes, layer=None, method="gradcam", batch_size=16, expand=True
):
    """Class activation maps of `classes` at `layer`, upsampled to the input's resolution.

    GradCAM and GradCAM++ differentiate only the part of the network after `layer` when
    that part reads nothing else (always so for the default, the last cell; see
    `split_at`); ScoreCAM masks the input image and so always runs the whole network.

    Args:
        model: a logits-output `keras.Model`.
        images: float32 [N, H, W, 3], normalised as the model expects.
        classes: int [N], the class each map explains.
        layer: target layer name (default: the last DARTS cell).
        method: "gradcam", "gradcam++" or "scorecam" (tf-keras-vis implementations).
        batch_size: images per call (ScoreCAM runs `channels` forward passes per image).
        expand: upsample the maps (bilinearly) to the images' height and width.

    Returns:
        float32 [N, H, W] (or [N, h, w] at the layer's resolution when not `expand`), each
        map min-max normalised to 0..1 (all zeros where it is nowhere positive).
    """
    if method not in METHODS:
        raise UserInputError(f"--method {method!r} is unknown; expected one of {METHODS}.")
    layer = resolve_layer(model, layer)
    split = split_at(model, layer) if method != "scorecam" else None
    if split is None:
        visualizer, target = _visualizer(method, model), layer
    else:
        visualizer, target = _visualizer(method, split[1]), FEATURES
    images = np.asarray(images, np.float32)
    classes = np.asarray(classes, np.int64)
    maps = []
    with warnings.catch_warnings():
        # tf-keras-vis feeds a list of one tensor to our one-input models: harmless.
        warnings.filterwarnings("ignore", message=".*structure of `inputs`.*")
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            seed = batch if split is None else split[0](batch, training=False)
            cams = visualizer(
                CategoricalScore(classes[start : start + batch_size].tolist()),
                seed,
                penultimate_layer=target,
                seek_penultimate_conv_layer=False,
                expand_cam=False,
            )
            maps.append(np.asarray(cams, np.float32).reshape(len(batch), *cams.shape[-2:]))
    maps = np.concatenate(maps)
    return resize_maps(maps, images.shape[1], images.shape[2]) if expand else maps


def predict_probabilities(model, images, batch_size=64):
    """softmax(logits) of normalised float images, [N, num_classes]."""
    logits = [
        model(images[i : i + batch_size], training=False) for i in range(0, len(images), batch_size)
    ]
    return keras.ops.convert_to_numpy(keras.ops.softmax(keras.ops.concatenate(logits), axis=-1))


def resize_maps(maps, height, width=None):
    """[N, h, w] float maps -> [N, height, width] (bilinear; width defaults to height)."""
    maps = np.asarray(maps, np.float32)
    shape = (height, width or height)
    if maps.shape[1:] == shape:
        return maps
    return tf.image.resize(maps[..., None], shape, method="bilinear").numpy()[..., 0]


def overlay(image, heat, alpha=0.5, colormap="jet"):
    """RGB float 0..1: `image` (uint8 [H, W, 3]) blended with the coloured `heat` [H, W]."""
    colours = colormaps[colormap](np.clip(heat, 0.0, 1.0))[..., :3]
    return (1.0 - alpha) * (np.asarray(image, np.float32) / 255.0) + alpha * colours


@dataclasses.dataclass
class GradcamConfig:
    """What `run_gradcam` needs; written as `<output>.config.json` beside the picture.

    Args:
        models: `.keras` files or run directories holding `model.keras`.
        output: the PNG to write; the maps go to the same path with `.npz`.
        model_labels: one row label per model (default: run directory or file names).
        images: image files to explain; when empty, `indices` of `split` of `dataset`.
        dataset: `data.load_source` name; also supplies mean/std/class names to models
            saved without a `dataset.json`.
        data_dir: TFDS data directory.
        image_size: size of the dataset's images.
        seed: seed of the dataset's split (digits, folders).
        split: "train" or "test".
        indices: positions in `split` of the images to explain.
        method: "gradcam", "gradcam++" or "scorecam".
        layer: target layer name (default: each model's last cell).
        target: explain the "predicted" class or the true "label".
        upsample: side in pixels of each drawn picture (the paper uses 224).
        alpha: opacity of the heat map over the image.
        batch_size: images per GradCAM call.
    """

    models: list[str]
    output: str = "gradcam.png"
    model_labels: list[str] | None = None
    images: list[str] | None = None
    dataset: str = "cifar10"
    data_dir: str | None = None
    image_size: int = 32
    seed: int = 0
    split: str = "test"
    indices: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3])
    method: str = "gradcam"
    layer: str | None = None
    target: str = "predicted"
    upsample: int = 224
    alpha: float = 0.5
    batch_size: int = 16

    def validate(self):
        if not self.models:
            raise UserInputError("--model is required: one or more .keras files or run dirs.")
        if self.model_labels and len(self.model_labels) != len(self.models):
            raise UserInputError(
                f"--model_labels has {len(self.model_labels)} labels for {len(self.models)} "
                "models; give one per model or none."
            )
        if self.method not in METHODS:
            raise UserInputError(f"--method {self.method!r} is unknown; expected {METHODS}.")
        if self.target not in TARGETS:
            raise UserInputError(f"--target {self.target!r} is unknown; expected {TARGETS}.")
        if self.target == "label" and self.images:
            raise UserInputError("--target=label needs dataset images; --images have no labels.")
        if not self.images and (not self.indices or min(self.indices) < 0):
            raise UserInputError(f"--indices must list positions >= 0, got {self.indices}.")
        if not str(self.output).lower().endswith(".png"):
            raise UserInputError(f"--output {self.output!r} must be a .png path.")
        if not 16 <= self.upsample <= 2048:
            raise UserInputError(f"--upsample must be in 16..2048 pixels, got {self.upsample}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserInputError(f"--alpha must be in 0..1, got {self.alpha}.")
        if self.batch_size < 1:
            raise UserInputError(f"--batch_size must be >= 1, got {self.batch_size}.")

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Inputs:
    images: np.ndarray  # uint8 [N, S, S, 3], the pictures drawn
    labels: np.ndarray  # int [N], NO_LABEL for image files
    titles: list[str]
    source: data.Source | None


def _load_inputs(config, classifiers):
    if config.images:
        images = read_image_files(config.images, classifiers[0].image_size)
        titles = [os.path.basename(path) for path in config.images]
        return _Inputs(images, np.full(len(images), NO_LABEL), titles, None)
    source = data.load_source(config.dataset, config.data_dir, config.image_size, config.seed)
    images, labels = source.numpy(config.split, limit=max(config.indices) + 1)
    if max(config.indices) >= len(images):
        raise UserInputError(
            f"--indices {config.indices} exceed the {len(images)} images of the "
            f"{config.split!r} split of {config.dataset!r}."
        )
    images, labels = images[config.indices], labels[config.indices]
    names = source.info.class_names
    titles = [f"label: {names[y]}" if 0 <= y < len(names) else str(y) for y in labels]
    return _Inputs(images, labels, titles, source)


def _info(classifier, inputs, config):
    """The model's own dataset.json, else the dataset's info (loaded only when needed)."""
    info = classifier.info
    if info is None:
        if inputs.source is None:
            inputs.source = data.load_source(
                config.dataset, config.data_dir, config.image_size, config.seed
            )
        info = inputs.source.info
    source = inputs.source
    if classifier.info is not None and source is not None:
        theirs, ours = tuple(source.info.class_names), tuple(classifier.info.class_names)
        if theirs != ours:
            if config.target == "label":
                raise UserInputError(
                    f"--target=label explains the labels of {source.info.name!r}, whose "
                    f"classes differ from those model {classifier.path!r} was trained on "
                    f"({classifier.info.name!r}); use --target=predicted or its dataset."
                )
            logging.warning(
                "The images come from %r, whose classes (%s) differ from those model %r was "
                "trained on (%r: %s); its maps and predictions name the model's classes.",
                source.info.name,
                ", ".join(theirs[:5]) + (", ..." if len(theirs) > 5 else ""),
                classifier.path,
                classifier.info.name,
                ", ".join(ours[:5]) + (", ..." if len(ours) > 5 else ""),
            )
    outputs = int(classifier.model.output_shape[-1])
    if outputs != info.num_classes:
        raise UserInputError(
            f"Model {classifier.path!r} has {outputs} outputs but its dataset "
            f"{info.name!r} has {info.num_classes} classes; pass the dataset it was trained on."
        )
    return info


def explain(classifier, inputs, config, layer):
    """One figure row: predictions, probabilities, targets and maps of one model."""
    info = _info(classifier, inputs, config)
    x = data.normalize(resize_images(inputs.images, classifier.image_size), info).numpy()
    probabilities = predict_probabilities(classifier.model, x)
    predictions = probabilities.argmax(axis=-1)
    targets = predictions if config.target == "predicted" else inputs.labels
    if config.target == "label" and targets.max() >= info.num_classes:
        raise UserInputError(f"Labels of {config.dataset!r} exceed the classes of the model.")
    maps = class_activation_maps(
        classifier.model, x, targets, layer, config.method, config.batch_size
    )
    names = info.class_names
    chosen = probabilities[np.arange(len(predictions)), predictions]
    titles = [f"pred: {names[p]} ({q:.0%})" for p, q in zip(predictions, chosen, strict=True)]
    return {
        "label": classifier.label,
        "maps": resize_maps(maps, inputs.images.shape[1]),
        "predictions": predictions,
        "probabilities": chosen,
        "targets": np.asarray(targets),
        "titles": titles,
    }


def gradcam_figure(images, titles, rows, upsample=224, alpha=0.5, method="gradcam"):
    """The Fig. 5 grid: input images on top, one row of heat maps per model.

    Args:
        images: uint8 [N, S, S, 3].
        titles: N captions of the first row (true labels or file names).
        rows: dicts with "label", "maps" ([N, S, S] in 0..1) and "titles" (N captions).
        upsample: side in pixels each picture is resized to before drawing.
        alpha: heat map opacity.
        method: named in the figure's title.

    Returns:
        The matplotlib `Figure`.
    """
    count = len(images)
    big = resize_images(images, upsample)
    figure, axes = plt.subplots(
        len(rows) + 1, count, figsize=(2.4 * count + 0.6, 2.5 * (len(rows) + 1)), squeeze=False
    )
    for j in range(count):
        axes[0, j].imshow(big[j])
        axes[0, j].set_title(titles[j], fontsize=11)
        for i, row in enumerate(rows, start=1):
            heat = resize_maps(row["maps"][j : j + 1], upsample)[0]
            axes[i, j].imshow(overlay(big[j], heat, alpha))
            axes[i, j].set_title(row["titles"][j], fontsize=10)
    for i, axis_row in enumerate(axes):
        for axis in axis_row:
            axis.set_xticks([])
            axis.set_yticks([])
        axis_row[0].set_ylabel("input" if i == 0 else rows[i - 1]["label"], fontsize=11)
    figure.suptitle(f"{METHOD_NAMES[method]}: what drives each model's prediction")
    figure.tight_layout()
    return figure


def run_gradcam(config):
    """Explains images with every model and writes the grid, the maps and the config.

    Everything is loaded and checked before the first file is written, so bad input leaves
    existing outputs untouched.

    Returns:
        {"figure": png path, "maps": npz path, "config": json path, "rows": per-model dicts}.
    """
    config.validate()
    labels = config.model_labels or [None] * len(config.models)
    classifiers = [
        load_classifier(spec, label) for spec, label in zip(config.models, labels, strict=True)
    ]
    layers = [resolve_layer(c.model, config.layer) for c in classifiers]
    inputs = _load_inputs(config, classifiers)
    rows = [
        explain(classifier, inputs, config, layer)
        for classifier, layer in zip(classifiers, layers, strict=True)
    ]
    figure = gradcam_figure(
        inputs.images, inputs.titles, rows, config.upsample, config.alpha, config.method
    )
    output = pathlib.Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plots.save_figure(figure, output)
    maps_path = output.with_suffix(".npz")
    np.savez_compressed(
        maps_path,
        maps=np.stack([row["maps"] for row in rows]),
        images=inputs.images,
        labels=inputs.labels,
        predictions=np.stack([row["predictions"] for row in rows]),
        probabilities=np.stack([row["probabilities"] for row in rows]),
        targets=np.stack([row["targets"] for row in rows]),
        model_labels=np.asarray([row["label"] for row in rows]),
        layers=np.asarray(layers),
    )
    config_path = output.with_suffix(".config.json")
    write_json_atomic(config_path, {**config.to_dict(), "layers": layers})
    return {
        "figure": str(output),
        "maps": str(maps_path),
        "config": str(config_path),
        "rows": rows,
    }
