"""The training fast paths of pibconv_tf.layers and PIBConv compute what the plain forms do.

`layers.BatchNorm` (one-pass statistics), `layers.Conv2D` (1x1 as a matrix product) and
PIBConv's training form (F branches of 1x1 + depthwise convolutions) must match Keras'
layers and PIBConv's two-step form in outputs, gradients and moving statistics.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from pibconv_tf import layers as L
from pibconv_tf.pib_conv import PIBConv
from tests import test_case


def _gradients(function, x, variables):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = function(x)
        # A loss that weights every output differently, so that no gradient is trivial.
        loss = tf.reduce_sum(y * tf.random.stateless_normal(y.shape, (1, 2), dtype=y.dtype))
    return y, tape.gradient(loss, [x, *variables])


class BatchNormTest(test_case.TestCase):
    @parameterized.parameters(True, False)
    def test_training_matches_keras(self, affine):
        rng = np.random.default_rng(0)
        # An offset and uneven channel scales: the one-pass variance must still be exact.
        x = (rng.normal(size=(4, 6, 6, 5)) * [0.5, 1, 2, 4, 8] + 3.0).astype("float32")
        ours, theirs = (
            L.batch_norm(affine, "ours"),
            keras.layers.BatchNormalization(
                epsilon=L.BN_EPSILON, momentum=L.BN_MOMENTUM, center=affine, scale=affine
            ),
        )
        for layer in (ours, theirs):
            layer.build(x.shape)
            if affine:
                layer.gamma.assign(rng.uniform(0.5, 2.0, 5).astype("float32"))
                layer.beta.assign(rng.normal(size=5).astype("float32"))
        ours.set_weights(theirs.get_weights())
        y_ours, g_ours = _gradients(lambda t: ours(t, training=True), x, ours.trainable_weights)
        y_theirs, g_theirs = _gradients(
            lambda t: theirs(t, training=True), x, theirs.trainable_weights
        )
        self.assertAllClose(y_ours, y_theirs, atol=2e-5)
        for a, b in zip(g_ours, g_theirs, strict=True):
            self.assertAllClose(a, b, atol=2e-5, rtol=1e-4)
        self.assertAllClose(ours.moving_mean, theirs.moving_mean, atol=1e-6)
        self.assertAllClose(ours.moving_variance, theirs.moving_variance, rtol=1e-5)
        self.assertAllClose(ours(x, training=False), theirs(x, training=False), atol=1e-5)

    def test_float16_inputs_keep_float32_statistics(self):
        x = np.random.default_rng(1).normal(2.0, 3.0, (8, 4, 4, 3)).astype("float16")
        layer = L.BatchNorm(dtype="mixed_float16")
        y = layer(x, training=True)
        self.assertEqual(y.dtype, "float16")
        self.assertEqual(layer.moving_mean.dtype, "float32")
        normalised = np.asarray(y, "float32")
        self.assertAllClose(normalised.mean(axis=(0, 1, 2)), np.zeros(3), atol=2e-3)
        self.assertAllClose(normalised.std(axis=(0, 1, 2)), np.ones(3), atol=2e-3)

    def test_serialization_round_trip(self):
        self.run_layer_test(
            L.BatchNorm, {"epsilon": 1e-5, "momentum": 0.9}, (2, 4, 4, 3), (2, 4, 4, 3)
        )

    def test_float32_images_take_the_fused_kernel_and_float64_the_one_pass_form(self):
        for dtype, fused in (("float32", True), ("float64", False)):
            layer = L.BatchNorm(dtype=dtype)
            layer.build((2, 4, 4, 3))
            x = tf.zeros((2, 4, 4, 3), dtype)
            graph = tf.function(lambda t, bn=layer: bn(t, training=True))
            graph = graph.get_concrete_function(x).graph
            types = {op.type for op in graph.get_operations()}
            self.assertEqual("FusedBatchNormV3" in types, fused, dtype)

    @parameterized.parameters(True, False)
    def test_fused_kernel_matches_the_one_pass_form_to_second_derivatives(self, affine):
        # The float32 fused kernel against the float64 one-pass form (exact second
        # derivatives, checked against finite differences in test_search): outputs, input
        # gradients, Hessian-vector products and moving statistics.
        rng = np.random.default_rng(4)
        x = rng.normal(size=(3, 5, 5, 4)) * [0.5, 1, 2, 4] + 2.0
        weights = rng.normal(size=x.shape)
        results, layers = [], []
        for dtype in ("float32", "float64"):
            layer = L.BatchNorm(
                epsilon=L.BN_EPSILON,
                momentum=L.BN_MOMENTUM,
                center=affine,
                scale=affine,
                dtype=dtype,
            )
            layer.build(x.shape)
            if affine:
                layer.gamma.assign([1.5, 0.7, 1.1, 0.9])
                layer.beta.assign([0.1, -0.2, 0.3, 0.0])
            t, w = tf.constant(x, dtype), tf.constant(weights, dtype)
            with tf.GradientTape() as outer:
                outer.watch(t)
                with tf.GradientTape() as inner:
                    inner.watch(t)
                    y = layer(t, training=True)
                    loss = tf.reduce_sum(tf.square(y) * w)
                g = inner.gradient(loss, t)
                directional = tf.reduce_sum(g * w)
            results.append([y, g, outer.gradient(directional, t)])
            layers.append(layer)
        for fused, exact in zip(*results, strict=True):
            scale = float(np.abs(exact).max())
            self.assertAllClose(tf.cast(fused, "float64"), exact, atol=2e-6 * scale)
        for name in ("moving_mean", "moving_variance"):
            self.assertAllClose(
                getattr(layers[0], name), getattr(layers[1], name), rtol=1e-5, atol=1e-6
            )


class GeluTest(test_case.TestCase):
    def test_training_form_has_the_exact_gelu_value_and_derivatives(self):
        grid = np.linspace(-6.0, 6.0, 97)
        x = tf.constant(grid)
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = L.gelu(x, training=True)
            first = inner.gradient(y, x)
        second = outer.gradient(first, x)
        cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in grid])
        density = np.exp(-0.5 * grid**2) / math.sqrt(2.0 * math.pi)
        self.assertAllClose(y, grid * cdf, atol=1e-14, rtol=1e-12)
        self.assertAllClose(first, cdf + grid * density, atol=1e-14, rtol=1e-12)
        self.assertAllClose(second, density * (2.0 - grid**2), atol=1e-14, rtol=1e-12)
        # Keras' inference form computes the same function (its float64 constants are
        # rounded to ~1e-8).
        self.assertAllClose(keras.ops.gelu(x, approximate=False), y, atol=1e-7)


class Conv2DTest(test_case.TestCase):
    @parameterized.parameters(((1, 1), 1), ((3, 3), 1), ((1, 1), 2))
    def test_matches_keras_conv_in_training_and_inference(self, kernel_size, strides):
        x = np.random.default_rng(2).normal(size=(2, 6, 6, 4)).astype("float32")
        ours = L.conv2d(7, kernel_size, strides, "torch", name="ours")
        padding = L.padding_mode(strides)
        theirs = keras.layers.Conv2D(7, kernel_size, strides, padding, use_bias=False)
        for layer in (ours, theirs):
            layer.build(x.shape)
        ours.set_weights(theirs.get_weights())
        for training in (True, False):
            y_ours, g_ours = _gradients(
                lambda t, training=training: ours(t, training=training), x, [ours.kernel]
            )
            y_theirs, g_theirs = _gradients(theirs, x, [theirs.kernel])
            self.assertAllClose(y_ours, y_theirs, atol=1e-5)
            for a, b in zip(g_ours, g_theirs, strict=True):
                self.assertAllClose(a, b, atol=1e-4, rtol=1e-5)

    def test_pointwise_training_form_is_a_matmul(self):
        layer = L.conv2d(3, 1, 1, "torch", name="pw")
        x = tf.zeros((1, 4, 4, 2))
        layer(x)
        graph = tf.function(lambda t: layer(t, training=True)).get_concrete_function(x).graph
        types = {op.type for op in graph.get_operations()}
        self.assertIn("MatMul", types)
        self.assertNotIn("Conv2D", types)


class PIBConvTrainingFormTest(test_case.TestCase):
    @parameterized.product(strides=(1, 2), expansion=(2, 3))
    def test_branches_equal_the_two_step_form(self, strides, expansion):
        x = np.random.default_rng(3).normal(size=(2, 9, 9, 6)).astype("float32")
        layer = PIBConv(6, 5, strides=strides, expansion=expansion)
        layer(x)
        variables = layer.trainable_weights

        def two_step(t):  # the inference graph, with batch statistics
            t = layer.dw(L.symmetric_pad(t, strides, 2))
            t = layer._grouped_conv(layer.pw_expand(layer.bn(t, training=True)))
            return layer.pw_project(keras.ops.gelu(t, approximate=False))

        y_fast, g_fast = _gradients(lambda t: layer(t, training=True), x, variables)
        y_plain, g_plain = _gradients(two_step, x, variables)
        self.assertAllClose(y_fast, y_plain, atol=1e-5)
        for a, b in zip(g_fast, g_plain, strict=True):
            self.assertAllClose(a, b, atol=1e-4, rtol=1e-4)
