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
