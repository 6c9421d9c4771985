"""Tests for pibconv_tf.insight.gradcam and apps.gradcam: maps that find the evidence, bad input."""

import json
import os

import keras
import numpy as np
import pytest
from PIL import Image
from tf_keras_vis.gradcam import Gradcam
from tf_keras_vis.utils.scores import CategoricalScore

from pibconv_tf import data
from pibconv_tf.errors import UserInputError
from pibconv_tf.insight import gradcam
from pibconv_tf.model import genotypes as G
from pibconv_tf.model import networks
from tests import app_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, SQUARE = 32, 8


def _squares(n, rng):
    """Noise; label 1 images hold a bright square at a random place in a random quadrant.

    Returns images (uint8), labels and the square's top-left corner (row, column).
    """
    images = np.clip(rng.normal(100.0, 30.0, (n, SIZE, SIZE, 3)), 0, 255)
    labels = rng.integers(0, 2, n).astype(np.int32)
    corners = np.zeros((n, 2), int)
    half = SIZE // 2
    for i in range(n):
        quadrant_row, quadrant_col = divmod(int(rng.integers(0, 4)), 2)
        top = quadrant_row * half + int(rng.integers(0, half - SQUARE + 1))
        left = quadrant_col * half + int(rng.integers(0, half - SQUARE + 1))
        corners[i] = top, left
        if labels[i]:
            images[i, top : top + SQUARE, left : left + SQUARE] = 250.0
    return images.astype(np.uint8), labels, corners


def _peak_in_square(maps, corners, margin=1):
    """Share of maps whose maximum lies in the square (grown by `margin` pixels)."""
    hits = []
    for heat, (top, left) in zip(maps, corners, strict=True):
        row, col = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(
            top - margin <= row < top + SQUARE + margin
            and left - margin <= col < left + SQUARE + margin
        )
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def square_model(tmp_path_factory):
    """A tiny PIBConv network trained to tell 'bright square somewhere' from noise."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    train, test = _squares(512, rng), _squares(64, rng)
    source = data.array_source("squares", train[:2], test[:2], ["noise", "square"])
    model = networks.network_cifar(G.PIBCONV, num_classes=2, init_channels=8, layers=2)
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x_train = data.normalize(train[0], source.info).numpy()
    model.fit(x_train, train[1], batch_size=32, epochs=3, verbose=0)
    run = tmp_path_factory.mktemp("square_run")
    model.save(run / "model.keras")
    (run / "dataset.json").write_text(json.dumps(source.info.to_json_dict()))
    return model, source.info, test, run


@pytest.mark.slow
@pytest.mark.parametrize("method", gradcam.METHODS)
def test_map_peaks_inside_the_square(square_model, method):
    model, info, (images, labels, corners), _ = square_model
    x = data.normalize(images, info).numpy()
    accuracy = np.mean(gradcam.predict_probabilities(model, x).argmax(-1) == labels)
    assert accuracy > 0.9, "the network did not learn the task; the test would be void"
    positive = np.flatnonzero(labels == 1)[:16]
    maps = gradcam.class_activation_maps(model, x[positive], labels[positive], method=method)
    assert maps.shape == (len(positive), SIZE, SIZE)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    # A map blind to the evidence would hit the 8x8 square (grown to 10x10) ~10% of the time.
    assert _peak_in_square(maps, corners[positive]) >= 0.8


def test_head_only_gradcam_equals_tf_keras_vis_on_the_whole_network():
    keras.utils.set_random_seed(1)
    model = networks.network_cifar(G.PIBCONV, num_classes=3, init_channels=8, layers=2)
    x = np.random.default_rng(1).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    classes = [0, 1, 2, 1]
    ours = gradcam.class_activation_maps(model, x, classes, expand=False)
    layer = networks.last_cell_name(model)
    theirs = Gradcam(model, clone=False)(
        CategoricalScore(classes),
        x,
        penultimate_layer=layer,
        seek_penultimate_conv_layer=False,
        expand_cam=False,
    )
    assert ours.shape == (4, 8, 8)
    assert ours.max() == pytest.approx(1.0, abs=1e-3)  # not a blank map
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-4)


def test_inner_layer_falls_back_to_the_whole_network():
    model = networks.network_cifar(G.PIBCONV, num_classes=3, init_channels=8, layers=3)
    assert gradcam.split_at(model, "cell_1") is None  # cell_2 also reads cell_0
    assert gradcam.split_at(model, "cell_2") is not None
    x = np.random.default_rng(2).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    maps = gradcam.class_activation_maps(model, x, [0, 2], layer="cell_1")
    assert maps.shape == (2, SIZE, SIZE) and np.isfinite(maps).all()


def test_resolve_layer():
    model = networks.network_cifar(G.PIBCONV, num_classes=3, init_channels=4, layers=3)
    assert gradcam.resolve_layer(model) == "cell_2"
    assert gradcam.resolve_layer(model, "cell_0") == "cell_0"
    with pytest.raises(UserInputError, match="Layer 'nope' is not in model"):
        gradcam.resolve_layer(model, "nope")
    with pytest.raises(UserInputError, match="needs a spatial"):
        gradcam.resolve_layer(model, "logits")


def test_read_image_files(tmp_path):
    good = tmp_path / "wide.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(good)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(np.full((40, 40), 50, np.uint8)).save(gray)
    images = gradcam.read_image_files([str(good), str(gray)], 16)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert abs(int(images[0].mean()) - 200) <= 1 and abs(int(images[1].mean()) - 50) <= 2
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(UserInputError, match="cannot be decoded"):
        gradcam.read_image_files([str(broken)], 16)
    with pytest.raises(UserInputError, match="does not exist"):
        gradcam.read_image_files([str(tmp_path / "missing.png")], 16)


def test_run_gradcam_on_dataset_images_targets_labels(tmp_path):
    keras.utils.set_random_seed(3)
    run = tmp_path / "digits_run"
    run.mkdir()
    model = networks.network_cifar(G.DARTS_V2, num_classes=10, init_channels=4, layers=2)
    model.save(run / "model.keras")  # no dataset.json: mean/std come from --dataset
    config = gradcam.GradcamConfig(
        models=[str(run)],
        output=str(tmp_path / "out" / "grid.png"),
        dataset="digits",
        indices=[3, 0, 7, 1],
        target="label",
        upsample=48,
    )
    summary = gradcam.run_gradcam(config)
    maps = np.load(summary["maps"])
    _, labels = data.load_source("digits").numpy("test", limit=8)
    np.testing.assert_array_equal(maps["labels"], labels[[3, 0, 7, 1]])
    np.testing.assert_array_equal(maps["targets"][0], labels[[3, 0, 7, 1]])
    assert maps["maps"].shape == (1, 4, SIZE, SIZE) and maps["images"].shape == (4, 32, 32, 3)
    assert list(maps["model_labels"]) == ["digits_run"]
    written = json.loads((tmp_path / "out" / "grid.config.json").read_text())
    assert written["target"] == "label" and written["layers"] == ["cell_1"]
    picture = np.asarray(Image.open(summary["figure"]))
    assert picture.shape[:2] == (500, 1020)  # 2 rows x 4 columns at 100 dpi
    assert picture.std() > 10


def test_images_of_other_classes_than_the_models_are_flagged(tmp_path, caplog):
    """A model trained on other classes than the dataset's: a warning with --target=predicted
    (the maps name the model's classes), a refusal with --target=label (issue 21)."""
    run = tmp_path / "letters_run"
    run.mkdir()
    networks.network_cifar(G.DARTS_V2, num_classes=10, init_channels=4, layers=2).save(
        run / "model.keras"
    )
    info = data.load_source("digits").info.to_json_dict()
    info.update(name="letters", class_names=[chr(ord("a") + i) for i in range(10)])
    (run / "dataset.json").write_text(json.dumps(info))
    config = dict(models=[str(run)], dataset="digits", indices=[0, 1], upsample=32)
    with caplog.at_level("WARNING"):
        gradcam.run_gradcam(
            gradcam.GradcamConfig(**config, output=str(tmp_path / "p.png"), target="predicted")
        )
    assert "whose classes (0, 1, 2, 3, 4, ...) differ from those model" in caplog.text
    assert (tmp_path / "p.png").exists()
    with pytest.raises(UserInputError, match="--target=label explains the labels of 'digits'"):
        gradcam.run_gradcam(
            gradcam.GradcamConfig(**config, output=str(tmp_path / "l.png"), target="label")
        )
    assert not (tmp_path / "l.png").exists()


def _apps(*commands):
    """Runs apps.gradcam once per argument list; returns CompletedProcesses."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return [app_process.run_app("apps.gradcam", *args, env=env, timeout=300) for args in commands]


@pytest.mark.slow
def test_app_on_image_files_finds_the_squares(square_model, tmp_path):
    _, _, (images, labels, corners), run = square_model
    chosen = np.flatnonzero(labels == 1)[:3]
    files = []
    for i in chosen:
        files.append(str(tmp_path / f"square_{i}.png"))
        Image.fromarray(images[i]).save(files[-1])
    output = tmp_path / "figs" / "squares.png"
    (result,) = _apps(
        [
            f"--model={run},{run / 'model.keras'}",
            "--model_labels=first,second",
            f"--images={','.join(files)}",
            f"--output={output}",
            "--upsample=64",
        ]
    )
    assert result.returncode == 0, result.stderr
    maps = np.load(output.with_suffix(".npz"))
    assert maps["maps"].shape == (2, 3, SIZE, SIZE)
    assert np.all(maps["labels"] == gradcam.NO_LABEL)
    assert np.all(maps["predictions"] == 1)
    assert _peak_in_square(maps["maps"][0], corners[chosen]) == 1.0
    picture = np.asarray(Image.open(output).convert("RGB"))
    assert picture.shape == (750, 780, 3)  # 3 rows x 3 columns at 100 dpi
    assert picture.std() > 10 and (picture < 250).any()


@pytest.mark.slow
def test_app_bad_input_fails_with_one_sentence(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    networks.network_cifar(G.PIBCONV, num_classes=2, init_channels=4, layers=2).save(
        run / "model.keras"
    )
    output = tmp_path / "kept.png"
    output.write_bytes(b"old")
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    no_layer, bad_image = _apps(
        [f"--model={run}", "--layer=nope", "--images=x.png", f"--output={output}"],
        [f"--model={run}", f"--images={broken}", f"--output={output}"],
    )
    assert no_layer.returncode == 1
    assert "error: Layer 'nope' is not in model" in no_layer.stderr
    assert bad_image.returncode == 1
    assert f"error: Image file '{broken}' cannot be decoded" in bad_image.stderr
    assert "Traceback" not in no_layer.stderr + bad_image.stderr
    assert output.read_bytes() == b"old"  # existing output untouched
