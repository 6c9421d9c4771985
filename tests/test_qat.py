"""Tests for pibconv_tf.deploy.qat and apps.qat: quantization-aware fine-tuning.

Single blocks fake-quantized by `FakeQuantGraph` must compute what their full-integer TFLite
conversion computes (within one output quantization step); the QAT run on a tiny 2-cell, C=4
network writes the comparison rows; bad input is refused before anything is written.
"""

import json
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert import interpreter as litert

from pibconv_tf import data
from pibconv_tf.deploy import qat, tflite
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import genotypes, networks, pib_conv

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")

SIZE = 16


def test_weights_round_per_channel_to_255_levels():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
    kernel[..., 2] *= 50.0  # a channel with another scale must not coarsen the others
    quantized = qat.quantize_weight(kernel, 1).numpy()
    scale = np.abs(kernel).max(axis=(0, 1, 2)) / 127.0
    levels = quantized / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.abs(np.round(levels)).max(axis=(0, 1, 2)).tolist() == [127.0] * 6
    np.testing.assert_allclose(quantized, np.round(kernel / scale) * scale, rtol=1e-5, atol=1e-6)


def _conv_bn(x, relu=False):
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.ReLU()(x) if relu else x


BLOCKS = {
    "conv_bn": _conv_bn,
    "conv_bn_relu": lambda x: _conv_bn(x, relu=True),
    "depthwise_pointwise": lambda x: keras.layers.Conv2D(6, 1, use_bias=False)(
        keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    ),
    "pib_conv": lambda x: pib_conv.PIBConv(4, 3)(x),
    "pool_dense": lambda x: keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x)),
}


def _random_batch_norms(model, rng):
    """Moving statistics and signed scales that make the BatchNorm fold matter."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=channels))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, channels))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.3, 2.0, channels) * rng.choice([-1, 1], channels))
                layer.beta.assign(rng.normal(size=channels))


def _int8_outputs(model, calibration, x):
    """The block as a full-integer TFLite model (float input/output), run on `x`."""
    with tempfile.TemporaryDirectory() as directory:
        archive = keras.export.ExportArchive()
        archive.track(model)
        spec = tf.TensorSpec([len(x), *x.shape[1:]], tf.float32, name=tflite.INPUT)
        archive.add_endpoint(
            tflite.SIGNATURE, lambda images: {tflite.LOGITS: model(images, training=False)}, [spec]
        )
        archive.write_out(directory, verbose=False)
        content = tflite.convert(directory, "tflite_int8", calibration, None, len(x))
    runner = litert.Interpreter(model_content=content).get_signature_runner(tflite.SIGNATURE)
    return runner(images=x)[tflite.LOGITS]


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_fake_quant_block_computes_its_int8_tflite_model(block):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, BLOCKS[block](inputs))
    _random_batch_norms(model, rng)
    calibration = rng.normal(size=(64, 8, 8, 4)).astype(np.float32)
    x = calibration[:8]
    expected = _int8_outputs(model, calibration, x)
    float_outputs = model(x).numpy()
    graph = qat.FakeQuantGraph(model)
    graph.calibrate(calibration)
    actual = graph(x).numpy()
    step = np.diff(np.unique(expected)).min()  # the int8 output's grid
    # Integer requantization may round a value sitting on a half step the other way.
    assert np.abs(actual - expected).max() <= 1.01 * step
    assert np.abs(actual - expected).mean() < 0.05 * np.abs(float_outputs - expected).mean()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = networks.network_cifar(
        genotypes.NAMED_GENOTYPES["PIBCONV"], layers=2, init_channels=4, image_size=SIZE
    )
    directory = tmp_path_factory.mktemp("trained")
    model.save(directory / "model.keras")
    info = data.load_source("digits", image_size=SIZE, seed=0).info
    (directory / "dataset.json").write_text(json.dumps(info.to_json_dict()))
    (directory / "config.json").write_text(json.dumps({"seed": 3}))  # the training run's
    return directory / "model.keras"


def test_qat_writes_the_comparison_rows(tmp_path, tiny_model):
    config = qat.QATConfig(
        model=str(tiny_model),
        output_dir=str(tmp_path / "qat"),
        dataset="digits",
        epochs=1,
        learning_rate=0.01,
        calibration_images=32,
        test_images=48,
        train_images=96,
    )
    report = qat.run_qat(config)
    out = tmp_path / "qat"
    assert json.loads((out / "parity.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["top1"]) == {"fp32", "ptq_int8", "qat_fp32", "qat_int8", "qat_fake_quant"}
    assert all(0.0 <= value <= 1.0 for value in report["top1"].values())
    assert report["images"] == {"source": "digits:test", "count": 48}
    settings = report["settings"]
    assert (settings["epochs"], settings["learning_rate"]) == (1, 0.01)
    assert settings["seed"] == 3  # the dataset splits as in training
    assert settings["calibration_images"] == 32
    for path in ("model_qat.keras", "ptq/model_int8.tflite", "qat/model_int8.tflite"):
        assert (out / path).is_file(), path
    # The fine-tuned model is a plain network (no fake-quant layers left) and moved.
    fine_tuned = keras.saving.load_model(out / "model_qat.keras")
    assert {type(layer) for layer in fine_tuned.layers}.isdisjoint(qat._SWITCHES.values())
    before = keras.saving.load_model(tiny_model).get_layer("logits").kernel.numpy()
    assert not np.allclose(fine_tuned.get_layer("logits").kernel.numpy(), before)
    ptq = json.loads((out / "ptq" / "parity.json").read_text())
    assert report["top1"]["ptq_int8"] == ptq["artifacts"]["tflite_int8"]["accuracy"]
    assert report["qat_fake_quant_vs_int8"]["top1_agreement"] > 0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "--epochs must be >= 1, got 0"),
        ({"learning_rate": float("nan")}, "--learning_rate must be a finite number > 0"),
        ({"model": "/nonexistent/model.keras"}, "is not a file"),
        ({"output_dir": "occupied"}, "is not empty; pass --overwrite"),
    ],
)
def test_bad_input_is_refused_without_writing(tmp_path, tiny_model, change, message):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    fields = {"model": str(tiny_model), "output_dir": str(tmp_path / "new"), "dataset": "digits"}
    fields.update(change)
    if fields["output_dir"] == "occupied":
        fields["output_dir"] = str(occupied)
    with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
        qat.run_qat(qat.QATConfig(**fields))
    assert not (tmp_path / "new").exists()
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
