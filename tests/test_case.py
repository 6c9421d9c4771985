"""Shared test helpers in the spirit of keras-hub's TestCase (written for this project)."""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized


class TestCase(parameterized.TestCase):
    """Base class: seeded, with layer and model round-trip helpers."""

    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(1234)
        keras.config.disable_traceback_filtering()

    def assertAllClose(self, actual, expected, atol=1e-6, rtol=1e-6, msg=None):
        np.testing.assert_allclose(
            np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol, err_msg=msg or ""
        )

    def run_layer_test(
        self,
        layer_cls,
        init_kwargs,
        input_shape,
        expected_output_shape,
        expected_num_trainable_weights=None,
        run_training_check=True,
        call_args=(),
    ):
        """Builds `layer_cls(**init_kwargs)` and checks symbolic and eager shapes, the config
        round trip (same config, same outputs with copied weights) and one training step.

        `input_shape` is one shape, or a list of shapes for a layer called on a list;
        `call_args` are further (constant) positional arguments, e.g. mixing weights.
        """
        layer = layer_cls(**init_kwargs)
        several = isinstance(input_shape, list)
        shapes = input_shape if several else [input_shape]
        symbolic_inputs = [keras.Input(shape[1:], batch_size=shape[0]) for shape in shapes]
        symbolic = layer(symbolic_inputs if several else symbolic_inputs[0], *call_args)
        self.assertEqual(tuple(symbolic.shape), tuple(expected_output_shape))
        rng = np.random.default_rng(0)
        arrays = [rng.normal(size=shape).astype("float32") for shape in shapes]
        inputs = arrays if several else arrays[0]
        outputs = layer(inputs, *call_args, training=False)
        self.assertEqual(tuple(outputs.shape), tuple(expected_output_shape))
        if expected_num_trainable_weights is not None:
            self.assertLen(layer.trainable_weights, expected_num_trainable_weights)

        config = layer.get_config()
        clone = layer_cls.from_config(config)
        clone(inputs, *call_args, training=False)
        clone.set_weights(layer.get_weights())
        self.assertEqual(clone.get_config(), config)
        self.assertAllClose(clone(inputs, *call_args, training=False), outputs, atol=1e-6)
        serialized = keras.saving.serialize_keras_object(layer)
        revived = keras.saving.deserialize_keras_object(serialized)
        self.assertIsInstance(revived, layer_cls)

        if run_training_check and layer.trainable_weights:
            self._run_training_step(layer, inputs, call_args)
        return layer

    def _run_training_step(self, layer, inputs, call_args=()):
        """One SGD step on a squared loss changes some trainable weight."""
        before = [np.array(w.numpy()) for w in layer.trainable_weights]
        optimizer = keras.optimizers.SGD(0.1)
        with tf.GradientTape() as tape:
            outputs = layer(inputs, *call_args, training=True)
            loss = tf.reduce_sum(tf.square(outputs - 1.0))
        grads = tape.gradient(loss, layer.trainable_weights)
        optimizer.apply(grads, layer.trainable_weights)
        changed = [
            not np.allclose(b, w.numpy())
            for b, w in zip(before, layer.trainable_weights, strict=True)
        ]
        self.assertTrue(any(changed), "one training step changed no trainable weight")

    def run_model_saving_test(self, model, inputs):
        """`.keras` save/load gives identical outputs."""
        expected = model(inputs, training=False)
        # absl's create_tempdir needs parsed flags, which pytest does not provide.
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "model.keras")
            model.save(path)
            restored = keras.saving.load_model(path)
        actual = restored(inputs, training=False)
        if isinstance(expected, dict):
            for key in expected:
                np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(expected[key]))
        else:
            np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
        return restored
