"""The training fast paths of pibconv_tf.layers and PIBConv compute what the plain forms do.

`layers.BatchNorm` (fused kernel or one-pass statistics), `layers.Conv2D` (1x1 as a matrix
product), `layers.DepthwiseConv2D` (CPU kernels with other gradients or explicit padding),
`layers.ConvBatchNorm` (the stem as one product of patches) and PIBConv's training form (F
branches of 1x1 + depthwise convolutions) must match Keras' layers and PIBConv's two-step
form in outputs, gradients and moving statistics.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from pibconv_tf.kernels import tensorflow_cpu as backend_kernels
from pibconv_tf.model import numerics as L
from pibconv_tf.model.pib_conv import PIBConv
from tests import test_case


def _gradients(function, x, variables):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = function(x)
        # A loss that weights every output differently, so that no gradient is trivial (the
        # same weights in every dtype).
        weights = np.random.default_rng(12).normal(size=y.shape)
        loss = tf.reduce_sum(y * tf.constant(weights, y.dtype))
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


class FusedBatchNormLayoutTest(test_case.TestCase):
    @parameterized.parameters(12, 16)
    def test_channel_counts_on_either_layout_match_the_one_pass_form(self, channels):
        # C = 12 takes the [N H W, 1, 1, C] view of the fused kernel on a CPU, C = 16 not.
        x = np.random.default_rng(5).normal(1.0, 2.0, (3, 5, 7, channels))
        results = []
        for dtype in ("float32", "float64"):
            layer = L.BatchNorm(epsilon=L.BN_EPSILON, momentum=L.BN_MOMENTUM, dtype=dtype)
            layer.build(x.shape)
            layer.gamma.assign(np.linspace(0.5, 1.5, channels))
            y, grads = _gradients(
                lambda t, bn=layer: bn(t, training=True),
                tf.constant(x, dtype),
                layer.trainable_weights,
            )
            results.append([y, *grads, layer.moving_mean, layer.moving_variance])
        for fused, exact in zip(*results, strict=True):
            self.assertAllClose(fused, exact, atol=2e-5, rtol=1e-4)
        # The fused kernel sees the [N H W, 1, 1, C] view exactly when C % 16 != 0.
        layer = L.BatchNorm(dtype="float32")
        layer.build(x.shape)
        graph = tf.function(lambda t: layer(t, training=True))
        graph = graph.get_concrete_function(tf.constant(x, "float32")).graph
        (fused,) = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
        self.assertEqual(fused.inputs[0].shape.as_list()[1:3] == [1, 1], bool(channels % 16))


def _depthwise_pair(kernel_size, strides, dilation, channels):
    ours = L.depthwise_conv2d(kernel_size, strides, "torch", "ours", dilation)
    theirs = keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding=L.padding_mode(strides),
        dilation_rate=dilation,
        use_bias=False,
    )
    for layer in (ours, theirs):
        layer.build((None, None, None, channels))
    ours.set_weights(theirs.get_weights())
    return ours, theirs


class DepthwiseConv2DTest(test_case.TestCase):
    @parameterized.product(
        case=((5, 1, 1), (7, 1, 1), (5, 1, 2), (3, 2, 1), (5, 2, 1), (7, 2, 1)), size=(8, 9)
    )
    def test_training_kernels_match_keras(self, case, size):
        kernel_size, strides, dilation = case
        pad = dilation * (kernel_size // 2)
        x = np.random.default_rng(6).normal(size=(3, size, size, 5)).astype("float32")
        ours, theirs = _depthwise_pair(kernel_size, strides, dilation, 5)
        self.assertTrue(
            backend_kernels.depthwise_training_available(
                tf.constant(x), ours.kernel_size, ours.strides, ours.dilation_rate
            )
        )
        y_ours, g_ours = _gradients(lambda t: ours(t, training=True, pad=pad), x, [ours.kernel])
        y_theirs, g_theirs = _gradients(
            lambda t: theirs(L.symmetric_pad(t, strides, pad)), x, [theirs.kernel]
        )
        self.assertAllClose(y_ours, y_theirs, atol=1e-5)
        for a, b in zip(g_ours, g_theirs, strict=True):
            self.assertAllClose(a, b, atol=1e-4, rtol=1e-4)
        # Inference is Keras' graph (what converters see).
        self.assertAllClose(ours(x, pad=pad), y_theirs, atol=1e-6)

    @parameterized.parameters((5, 1), (3, 2))
    def test_training_kernels_are_the_intended_ones(self, kernel_size, strides):
        ours, _ = _depthwise_pair(kernel_size, strides, 1, 4)
        x = tf.zeros((2, 8, 8, 4))

        def step(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = ours(t, training=True, pad=kernel_size // 2)
            return tape.gradient(y, [t, ours.kernel])

        types = {
            op.type for op in tf.function(step).get_concrete_function(x).graph.get_operations()
        }
        if strides == 1:  # the filter gradient as a forward convolution
            self.assertNotIn("DepthwiseConv2dNativeBackpropFilter", types)
        else:  # explicit padding: no padded copy of the input
            self.assertNotIn("Pad", types)
            self.assertIn("DepthwiseConv2dNativeBackpropFilter", types)

    def test_3x3_stride_1_and_other_types_stay_keras(self):
        x = tf.zeros((2, 8, 8, 4))
        self.assertFalse(backend_kernels.depthwise_training_available(x, (3, 3), (1, 1), (1, 1)))
        self.assertFalse(backend_kernels.depthwise_training_available(x, (5, 5), (2, 2), (2, 2)))
        self.assertTrue(backend_kernels.depthwise_training_available(x, (3, 3), (2, 2), (1, 1)))
        # Only float32 was measured: other types keep TensorFlow's kernels.
        half = tf.cast(x, "float16")
        self.assertFalse(backend_kernels.depthwise_training_available(half, (5, 5), (1, 1), (1, 1)))

    @parameterized.parameters((5, 1), (3, 2))
    def test_second_derivatives_match_keras(self, kernel_size, strides):
        # Hessian-vector products of a quadratic loss, along a direction in (x, kernel):
        # every block of second derivatives (x-x, x-kernel, kernel-kernel) is exercised.
        pad = kernel_size // 2
        rng = np.random.default_rng(7)
        x = tf.constant(rng.normal(size=(2, 7, 7, 3)), "float32")
        v_x = tf.constant(rng.normal(size=(2, 7, 7, 3)), "float32")
        v_k = tf.constant(rng.normal(size=(kernel_size, kernel_size, 3, 1)), "float32")
        ours, theirs = _depthwise_pair(kernel_size, strides, 1, 3)

        def hessian_vector(call, kernel):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    y = call(x)
                    loss = tf.reduce_sum(tf.square(y)) * 0.5
                g_x, g_k = inner.gradient(loss, [x, kernel])
                directional = tf.reduce_sum(g_x * v_x) + tf.reduce_sum(g_k * v_k)
            return outer.gradient(directional, [x, kernel])

        ours_hv = hessian_vector(lambda t: ours(t, training=True, pad=pad), ours.kernel)
        theirs_hv = hessian_vector(
            lambda t: theirs(L.symmetric_pad(t, strides, pad)), theirs.kernel
        )
        for a, b in zip(ours_hv, theirs_hv, strict=True):
            self.assertAllClose(a, b, atol=1e-3, rtol=1e-4)

    def test_symbolic_shape_counts_the_padding(self):
        layer = L.depthwise_conv2d(5, 2, "torch", "dw")
        symbolic = layer(keras.Input((9, 9, 4)), pad=2)
        eager = layer(np.zeros((1, 9, 9, 4), "float32"), pad=2)
        self.assertEqual(tuple(symbolic.shape[1:]), tuple(eager.shape[1:]))
        self.assertEqual(tuple(eager.shape[1:]), (5, 5, 4))


class ConvBatchNormTest(test_case.TestCase):
    @parameterized.parameters("float32", "float64")
    def test_training_matches_conv_then_batch_norm(self, dtype):
        rng = np.random.default_rng(9)
        # Offset, unevenly scaled channels: the covariance form must not lose precision.
        x = rng.normal(size=(4, 9, 9, 3)) * [0.5, 1.0, 3.0] + [1.0, -2.0, 0.5]
        stem = L.ConvBatchNorm(6, 3, dtype=dtype)
        conv = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, dtype=dtype)
        bn = L.BatchNorm(epsilon=L.BN_EPSILON, momentum=L.BN_MOMENTUM, dtype=dtype)
        stem.build(x.shape)
        conv.build(x.shape)
        bn.build((None, 9, 9, 6))
        conv.set_weights(stem.conv.get_weights())
        bn.gamma.assign(rng.uniform(0.5, 2.0, 6))
        bn.beta.assign(rng.normal(size=6))
        stem.bn.set_weights(bn.get_weights())
        t = tf.constant(x, dtype)
        y_ours, g_ours = _gradients(
            lambda u: stem(u, training=True), t, [stem.conv.kernel, stem.bn.gamma, stem.bn.beta]
        )
        y_plain, g_plain = _gradients(
            lambda u: bn(conv(u), training=True), t, [conv.kernel, bn.gamma, bn.beta]
        )
        tolerance = 1e-10 if dtype == "float64" else 2e-5
        self.assertAllClose(y_ours, y_plain, atol=tolerance)
        for a, b in zip(g_ours, g_plain, strict=True):
            self.assertAllClose(a, b, atol=20 * tolerance, rtol=20 * tolerance)
        for name in ("moving_mean", "moving_variance"):
            self.assertAllClose(getattr(stem.bn, name), getattr(bn, name), atol=tolerance)
        self.assertAllClose(stem(t, training=False), bn(conv(t), training=False), atol=1e-5)

    def test_training_graph_is_products_without_batch_norm(self):
        stem = L.ConvBatchNorm(8, 3)
        x = tf.zeros((2, 8, 8, 3))
        stem(x)
        graph = tf.function(lambda t: stem(t, training=True)).get_concrete_function(x).graph
        types = [op.type for op in graph.get_operations()]
        self.assertFalse(any("BatchNorm" in name for name in types), types)
        # The patches (Keras extracts them with a one-hot convolution) and the products.
        self.assertLessEqual(types.count("Conv2D"), 1)
        self.assertGreaterEqual(types.count("MatMul"), 3)

    def test_serialization_round_trip(self):
        self.run_layer_test(
            L.ConvBatchNorm, {"filters": 5, "kernel_size": 3}, (2, 6, 6, 3), (2, 6, 6, 5)
        )

    def test_even_kernel_is_refused(self):
        with self.assertRaisesRegex(ValueError, "odd"):
            L.ConvBatchNorm(4, 2)


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
