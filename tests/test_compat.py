"""Models saved by earlier releases load and compute what they computed.

`tests/data/release_0_1/` holds 2-layer PIBCONV and DARTS_V2 models (5 classes, C=4, 16x16,
random BatchNorm statistics) saved by pibconv_tf 0.1, and their logits on fixed images. In
0.1 the `pibconv` space put GELU in its dilated and 7x1-1x7 convolutions; such a model keeps
that network (the space `pibconv_gelu` now), while a PIBCONV built today has ReLU there.
"""

import pathlib

import keras
import numpy as np
import pytest

from pibconv_tf import data
from pibconv_tf.model import cells, networks
from pibconv_tf.model import genotypes as G

DATA = pathlib.Path(__file__).parent / "data" / "release_0_1"


def _load(name):
    return keras.saving.load_model(DATA / f"{name}_l2.keras")


@pytest.mark.parametrize("name", ["pibconv", "darts_v2"])
def test_release_0_1_models_compute_their_saved_logits(name):
    expected = np.load(DATA / "expected.npz")
    model = _load(name)
    np.testing.assert_allclose(
        np.asarray(model(expected["images"], training=False)), expected[name], atol=1e-6
    )


def test_release_0_1_pibconv_keeps_gelu_and_a_new_pibconv_has_relu():
    old = _load("pibconv").get_layer("cell_1")  # the reduction cell holds dil_conv_5x5
    assert old.activations == {"dil_conv": "gelu", "conv_7x1_1x7": "gelu"}
    dil = [op for op in old.edge_ops if op.name.endswith("dil_conv_5x5")]
    assert [op.activation for op in dil] == ["gelu"]
    new = networks.network_cifar(G.PIBCONV, 5, 4, 2, image_size=16).get_layer("cell_1")
    assert new.activations == {"dil_conv": "relu", "conv_7x1_1x7": "relu"}
    # The saved network with today's PIBCONV definition computes other logits.
    expected = np.load(DATA / "expected.npz")
    rebuilt = networks.network_cifar(G.PIBCONV, 5, 4, 2, image_size=16)
    rebuilt.set_weights(_load("pibconv").get_weights())
    gap = np.abs(np.asarray(rebuilt(expected["images"], training=False)) - expected["pibconv"])
    assert gap.max() > 1e-3


def test_cells_record_their_activations():
    cell = cells.Cell(G.PIBCONV, 4, reduction=True)
    config = cell.get_config()
    assert config["activations"] == {"dil_conv": "relu", "conv_7x1_1x7": "relu"}
    assert cells.Cell.from_config(config).activations == config["activations"]
    legacy = {key: value for key, value in config.items() if key != "activations"}
    assert cells.Cell.from_config(legacy).activations["dil_conv"] == "gelu"
    darts = cells.Cell(G.DARTS_V2, 4).get_config()
    del darts["activations"]
    assert cells.Cell.from_config(darts).activations == {"sep_conv": "relu", "dil_conv": "relu"}


def test_release_0_1_models_evaluate_and_export(tmp_path):
    """apps.evaluate's and apps.export's library calls on a 0.1 model (5 classes, 16x16):
    a folder dataset of 5 classes to evaluate on; SavedModel and float32 TFLite whose
    logits match the model's."""
    from PIL import Image  # noqa: PLC0415

    from pibconv_tf import evaluation  # noqa: PLC0415
    from pibconv_tf.deploy import export  # noqa: PLC0415

    rng = np.random.default_rng(0)
    for label in range(5):
        (tmp_path / "images" / f"class_{label}").mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / f"class_{label}" / f"{index}.png")
    model_path = str(DATA / "pibconv_l2.keras")
    folder = f"folder:{tmp_path / 'images'}"
    results = evaluation.evaluate_file(evaluation.EvaluateConfig(model=model_path, dataset=folder))
    test_images = data.load_source(folder, image_size=16).numpy("test")[0]
    assert results["num_images"] == len(test_images) > 0
    assert results["params"] == sum(
        int(np.prod(w.shape)) for w in _load("pibconv").trainable_weights
    )
    report = export.export_model(
        export.ExportConfig(
            model=model_path,
            output_dir=str(tmp_path / "export"),
            formats=("saved_model", "tflite_fp32"),
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            class_names=tuple(f"class_{i}" for i in range(5)),
            parity_images=8,
        )
    )
    for name in ("saved_model", "tflite_fp32"):
        row = report["artifacts"][name]
        assert row["passed"] and row["max_abs_logit_diff"] <= 1e-4, (name, row)
    assert (tmp_path / "export" / "model_fp32.tflite").stat().st_size > 10_000
