"""The CPU kernels (pibconv_tf/kernels) compute what the model's plain forms compute.

Each kernel runs with the switch on and is compared with the plain form (switch off) on
twin layers with the same weights: outputs, gradients (second derivatives for the depthwise
and BatchNorm kernels) and moving statistics; graph checks show that the intended kernels
are taken. A whole network trains to the same loss and gradients either way, and its
checkpoint and `.keras` file do not depend on the switch.
"""

import math
import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from pibconv_tf import runs
from pibconv_tf.model import acceleration, cells, networks
from pibconv_tf.model import genotypes as G
from pibconv_tf.model import numerics as L
from pibconv_tf.model.pib_conv import PIBConv
from tests import test_case

kernels = pytest.importorskip(
    "pibconv_tf.kernels.tensorflow_cpu", reason="the kernels folder is not in this tree"
)
pytestmark = pytest.mark.skipif(
    bool(tf.config.list_physical_devices("GPU")),
    reason="the CPU kernels apply on machines without GPUs; this one has a GPU",
)


def _gradients(function, x, variables):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = function(x)
        # A loss that weights every output differently, so that no gradient is trivial.
        weights = np.random.default_rng(12).normal(size=y.shape)
        loss = tf.reduce_sum(y * tf.constant(weights, y.dtype))
    return y, tape.gradient(loss, [x, *variables])


def _op_types(function, *args):
    graph = tf.function(function).get_concrete_function(*args).graph
    return [op.type for op in graph.get_operations()]


def _twins(make, shape):
    """Two layers from `make()`, built, with the same weights."""
    fast, plain = make(), make()
    for layer in (fast, plain):
        layer.build(shape)
    plain.set_weights(fast.get_weights())
    return fast, plain


def _on_and_off(call_fast, call_plain):
    with acceleration.using("on"):
        fast = call_fast()
    with acceleration.using("off"):
        plain = call_plain()
    return fast, plain


class SwitchTest(test_case.TestCase):
    def test_kernels_are_registered_and_the_switch_turns_them_off(self):
        self.assertEqual(
            acceleration.registered(),
            sorted(
                [
                    "after",
                    "batch_norm_training",
                    "conv2d_training",
                    "conv_batch_norm_training",
                    "depthwise_conv2d_training",
                    "gelu_training",
                    "pib_conv_expand_group",
                ]
            ),
        )
        with acceleration.using("off"):
            self.assertIsNone(acceleration.kernel("gelu_training"))
        with acceleration.using("on"):
            self.assertIsNotNone(acceleration.kernel("gelu_training"))
        with acceleration.using("auto"):  # this machine has no GPU: auto is on
            self.assertTrue(acceleration.enabled())
        with self.assertRaisesRegex(ValueError, "Unknown kernel mode 'fast'"):
            acceleration.set_mode("fast")

    def test_environment_variable_is_validated(self):
        previous = os.environ.get(acceleration.ENVIRONMENT_VARIABLE)
        try:
            os.environ[acceleration.ENVIRONMENT_VARIABLE] = "Off"
            self.assertEqual(acceleration.mode_from_environment(), "off")
            os.environ[acceleration.ENVIRONMENT_VARIABLE] = "maybe"
            with self.assertRaisesRegex(ValueError, "PIBCONV_CPU_KERNELS='maybe'"):
                acceleration.mode_from_environment()
        finally:
            if previous is None:
                os.environ.pop(acceleration.ENVIRONMENT_VARIABLE)
            else:
                os.environ[acceleration.ENVIRONMENT_VARIABLE] = previous


def _exact_batch_norm(x, gamma, beta, epsilon):
    """Training-mode BatchNorm with the gradient through the mean everywhere (exact second
    derivatives, which Keras' moments do not give)."""
    mean = tf.reduce_mean(x, axis=(0, 1, 2))
    variance = tf.reduce_mean(tf.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta


class BatchNormTest(test_case.TestCase):
    @parameterized.parameters(True, False)
    def test_fused_kernel_matches_keras(self, affine):
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(4, 6, 6, 5)) * [0.5, 1, 2, 4, 8] + 3.0).astype("float32")
        fast, plain = _twins(lambda: L.batch_norm(affine, "bn"), x.shape)
        if affine:
            for layer in (fast, plain):
                layer.gamma.assign(np.linspace(0.5, 2.0, 5))
                layer.beta.assign(np.linspace(-1.0, 1.0, 5))
        (y_fast, g_fast), (y_plain, g_plain) = _on_and_off(
            lambda: _gradients(lambda t: L.norm(fast, t, True), x, fast.trainable_weights),
            lambda: _gradients(lambda t: L.norm(plain, t, True), x, plain.trainable_weights),
        )
        self.assertAllClose(y_fast, y_plain, atol=2e-5)
        for a, b in zip(g_fast, g_plain, strict=True):
            self.assertAllClose(a, b, atol=2e-5, rtol=1e-4)
        self.assertAllClose(fast.moving_mean, plain.moving_mean, atol=1e-6)
        self.assertAllClose(fast.moving_variance, plain.moving_variance, rtol=1e-5)

    @parameterized.parameters((4, 6, 6, 5), (1, 1, 1, 16), (3, 2, 2, 32))
    def test_a_known_shape_gives_the_bits_of_an_unknown_one_in_fewer_nodes(self, *shape):
        # Traced with the count known, the biased variance is two nodes instead of ten.
        x = np.random.default_rng(2).normal(1.0, 2.0, shape).astype("float32")

        def statistics(t):
            return kernels.fused_batch_norm_training(t, None, None, L.BN_EPSILON)

        unknown = tf.TensorSpec((None, *shape[1:]), "float32")
        traced = {
            "known": tf.function(statistics).get_concrete_function(tf.TensorSpec(shape)),
            "unknown": tf.function(statistics).get_concrete_function(unknown),
        }
        known, dynamic = ([t.numpy() for t in traced[k](tf.constant(x))] for k in traced)
        for a, b in zip(known, dynamic, strict=True):
            np.testing.assert_array_equal(a, b)
        if math.prod(shape[:-1]) == 1:
            np.testing.assert_array_equal(known[2], np.zeros(shape[-1]))
        sizes = {k: len(f.graph.get_operations()) for k, f in traced.items()}
        self.assertLessEqual(sizes["known"] + 8, sizes["unknown"])

    def test_float32_takes_the_fused_kernel_and_float64_keras(self):
        for dtype, fused in (("float32", True), ("float64", False)):
            layer = L.batch_norm(True, "bn", dtype=dtype)
            layer.build((2, 4, 4, 3))
            x = tf.zeros((2, 4, 4, 3), dtype)
            with acceleration.using("on"):
                types = _op_types(lambda t, bn=layer: L.norm(bn, t, True), x)
            self.assertEqual("FusedBatchNormV3" in types, fused, dtype)
        with acceleration.using("off"):
            types = _op_types(lambda t, bn=layer: L.norm(bn, t, True), tf.zeros((2, 4, 4, 3)))
        self.assertNotIn("FusedBatchNormV3", types)

    def test_float16_inputs_keep_float32_statistics(self):
        x = np.random.default_rng(1).normal(2.0, 3.0, (8, 4, 4, 3)).astype("float16")
        layer = L.batch_norm(True, "bn", dtype="mixed_float16")
        layer.build(x.shape)
        with acceleration.using("on"):
            y = L.norm(layer, tf.constant(x), True)
        self.assertEqual(y.dtype, "float16")
        self.assertEqual(layer.moving_mean.dtype, "float32")
        normalised = np.asarray(y, "float32")
        self.assertAllClose(normalised.mean(axis=(0, 1, 2)), np.zeros(3), atol=2e-3)
        self.assertAllClose(normalised.std(axis=(0, 1, 2)), np.ones(3), atol=2e-3)

    @parameterized.parameters(12, 16)
    def test_both_layouts_of_the_fused_kernel_have_exact_second_derivatives(self, channels):
        # C = 12 takes the [N H W, 1, 1, C] view on a CPU, C = 16 not. Against a float64
        # reference with exact second derivatives: outputs, input gradients and
        # Hessian-vector products.
        rng = np.random.default_rng(4)
        x = rng.normal(size=(3, 5, 7, channels)) + 2.0
        weights = rng.normal(size=x.shape)
        gamma, beta = np.linspace(0.5, 1.5, channels), np.linspace(-0.3, 0.3, channels)
        layer = L.batch_norm(True, "bn")
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)

        def second_order(call, dtype):
            t, w = tf.constant(x, dtype), tf.constant(weights, dtype)
            with tf.GradientTape() as outer:
                outer.watch(t)
                with tf.GradientTape() as inner:
                    inner.watch(t)
                    y = call(t)
                    loss = tf.reduce_sum(tf.square(y) * w)
                g = inner.gradient(loss, t)
                directional = tf.reduce_sum(g * w)
            return [y, g, outer.gradient(directional, t)]

        with acceleration.using("on"):
            fused = second_order(lambda t: L.norm(layer, t, True), "float32")
        exact = second_order(lambda t: _exact_batch_norm(t, gamma, beta, L.BN_EPSILON), "float64")
        for a, b in zip(fused, exact, strict=True):
            scale = float(np.abs(b).max())
            self.assertAllClose(tf.cast(a, "float64"), b, atol=2e-6 * scale)
        graph_x = tf.constant(x, "float32")
        with acceleration.using("on"):
            graph = tf.function(lambda t: L.norm(layer, t, True))
            ops = graph.get_concrete_function(graph_x).graph.get_operations()
        (fused_op,) = [op for op in ops if op.type == "FusedBatchNormV3"]
        self.assertEqual(fused_op.inputs[0].shape.as_list()[1:3] == [1, 1], bool(channels % 16))


def _depthwise_twins(kernel_size, strides, dilation, channels):
    return _twins(
        lambda: L.depthwise_conv2d(kernel_size, strides, "torch", "dw", dilation),
        (None, None, None, channels),
    )


class DepthwiseTest(test_case.TestCase):
    @parameterized.product(
        case=((5, 1, 1), (7, 1, 1), (5, 1, 2), (3, 2, 1), (5, 2, 1), (7, 2, 1)), size=(8, 9)
    )
    def test_training_kernels_match_the_plain_convolution(self, case, size):
        kernel_size, strides, dilation = case
        pad = dilation * (kernel_size // 2)
        x = np.random.default_rng(6).normal(size=(3, size, size, 5)).astype("float32")
        fast, plain = _depthwise_twins(kernel_size, strides, dilation, 5)
        self.assertTrue(
            kernels.depthwise_training_available(
                tf.constant(x), fast.kernel_size, fast.strides, fast.dilation_rate
            )
        )
        (y_fast, g_fast), (y_plain, g_plain) = _on_and_off(
            lambda: _gradients(lambda t: L.depthwise(fast, t, True, pad), x, [fast.kernel]),
            lambda: _gradients(lambda t: L.depthwise(plain, t, True, pad), x, [plain.kernel]),
        )
        self.assertAllClose(y_fast, y_plain, atol=1e-5)
        for a, b in zip(g_fast, g_plain, strict=True):
            self.assertAllClose(a, b, atol=1e-4, rtol=1e-4)

    @parameterized.parameters((5, 1), (3, 2))
    def test_training_kernels_are_the_intended_ones(self, kernel_size, strides):
        fast, _ = _depthwise_twins(kernel_size, strides, 1, 4)
        x = tf.zeros((2, 8, 8, 4))

        def step(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = L.depthwise(fast, t, True, kernel_size // 2)
            return tape.gradient(y, [t, fast.kernel])

        with acceleration.using("on"):
            types = set(_op_types(step, x))
        if strides == 1:  # the filter gradient as a forward convolution
            self.assertNotIn("DepthwiseConv2dNativeBackpropFilter", types)
        else:  # explicit padding: no padded copy of the input
            self.assertNotIn("Pad", types)
            self.assertIn("DepthwiseConv2dNativeBackpropFilter", types)

    def test_3x3_stride_1_and_other_types_stay_plain(self):
        x = tf.zeros((2, 8, 8, 4))
        self.assertFalse(kernels.depthwise_training_available(x, (3, 3), (1, 1), (1, 1)))
        self.assertFalse(kernels.depthwise_training_available(x, (5, 5), (2, 2), (2, 2)))
        self.assertTrue(kernels.depthwise_training_available(x, (3, 3), (2, 2), (1, 1)))
        # Only float32 was measured: other types keep TensorFlow's kernels.
        half = tf.cast(x, "float16")
        self.assertFalse(kernels.depthwise_training_available(half, (5, 5), (1, 1), (1, 1)))

    @parameterized.parameters((5, 1), (3, 2))
    def test_second_derivatives_match_the_plain_convolution(self, kernel_size, strides):
        # Hessian-vector products of a quadratic loss along a direction in (x, kernel):
        # every block of second derivatives (x-x, x-kernel, kernel-kernel) is exercised.
        pad = kernel_size // 2
        rng = np.random.default_rng(7)
        x = tf.constant(rng.normal(size=(2, 7, 7, 3)), "float32")
        v_x = tf.constant(rng.normal(size=(2, 7, 7, 3)), "float32")
        v_k = tf.constant(rng.normal(size=(kernel_size, kernel_size, 3, 1)), "float32")
        fast, plain = _depthwise_twins(kernel_size, strides, 1, 3)

        def hessian_vector(layer):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    y = L.depthwise(layer, x, True, pad)
                    loss = tf.reduce_sum(tf.square(y)) * 0.5
                g_x, g_k = inner.gradient(loss, [x, layer.kernel])
                directional = tf.reduce_sum(g_x * v_x) + tf.reduce_sum(g_k * v_k)
            return outer.gradient(directional, [x, layer.kernel])

        fast_hv, plain_hv = _on_and_off(lambda: hessian_vector(fast), lambda: hessian_vector(plain))
        for a, b in zip(fast_hv, plain_hv, strict=True):
            self.assertAllClose(a, b, atol=1e-3, rtol=1e-4)


class ConvBatchNormTest(test_case.TestCase):
    @parameterized.parameters("float32", "float64")
    def test_one_product_matches_conv_then_batch_norm(self, dtype):
        rng = np.random.default_rng(9)
        # Offset, unevenly scaled channels: the covariance form must not lose precision.
        x = rng.normal(size=(4, 9, 9, 3)) * [0.5, 1.0, 3.0] + [1.0, -2.0, 0.5]
        fast, plain = _twins(lambda: L.ConvBatchNorm(6, 3, dtype=dtype), x.shape)
        for stem in (fast, plain):
            stem.bn.gamma.assign(np.linspace(0.5, 2.0, 6))
            stem.bn.beta.assign(np.linspace(-1.0, 1.0, 6))
        t = tf.constant(x, dtype)

        def run(stem):
            variables = [stem.conv.kernel, stem.bn.gamma, stem.bn.beta]
            return _gradients(lambda u: stem(u, training=True), t, variables)

        (y_fast, g_fast), (y_plain, g_plain) = _on_and_off(lambda: run(fast), lambda: run(plain))
        tolerance = 1e-10 if dtype == "float64" else 2e-5
        self.assertAllClose(y_fast, y_plain, atol=tolerance)
        for a, b in zip(g_fast, g_plain, strict=True):
            self.assertAllClose(a, b, atol=20 * tolerance, rtol=20 * tolerance)
        for name in ("moving_mean", "moving_variance"):
            self.assertAllClose(getattr(fast.bn, name), getattr(plain.bn, name), atol=tolerance)

    def test_training_graph_is_products_without_batch_norm(self):
        stem = L.ConvBatchNorm(8, 3)
        x = tf.zeros((2, 8, 8, 3))
        stem(x)
        with acceleration.using("on"):
            types = _op_types(lambda t: stem(t, training=True), x)
        self.assertFalse(any("BatchNorm" in name for name in types), types)
        # The patches (Keras extracts them with a one-hot convolution) and the products.
        self.assertLessEqual(types.count("Conv2D"), 1)
        self.assertGreaterEqual(types.count("MatMul"), 3)

    def test_a_synchronized_batch_norm_keeps_the_plain_layers(self):
        # The one-product form takes one replica's statistics: with --sync_batch_norm the
        # stem must normalise by the global batch's, as Keras' synchronized layer does.
        with L.synchronized_batch_norm():
            stem = L.ConvBatchNorm(8, 3)
        x = tf.zeros((2, 8, 8, 3))
        stem(x)
        with acceleration.using("on"):
            types = _op_types(lambda t: stem(t, training=True), x)
        self.assertNotIn("MatMul", types)


class GeluTest(test_case.TestCase):
    def test_both_training_forms_have_the_exact_gelu_value_and_derivatives(self):
        grid = np.linspace(-6.0, 6.0, 97)
        x = tf.constant(grid)
        cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in grid])
        density = np.exp(-0.5 * grid**2) / math.sqrt(2.0 * math.pi)
        for mode in ("on", "off"):
            with acceleration.using(mode), tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    y = L.gelu(x, training=True)
                first = inner.gradient(y, x)
            second = outer.gradient(first, x)
            self.assertAllClose(y, grid * cdf, atol=1e-14, rtol=1e-12, msg=mode)
            self.assertAllClose(first, cdf + grid * density, atol=1e-14, rtol=1e-12, msg=mode)
            self.assertAllClose(second, density * (2.0 - grid**2), atol=1e-13, rtol=1e-12)
        # Keras' inference form computes the same function (float64 constants ~1e-8).
        self.assertAllClose(L.gelu(x, training=False), grid * cdf, atol=1e-7)
        with acceleration.using("on"):
            types = _op_types(lambda t: L.gelu(t, training=True), tf.zeros(3))
        self.assertIn("IdentityN", types)  # the custom gradient


class PointwiseTest(test_case.TestCase):
    @parameterized.parameters(((1, 1), 1), ((3, 3), 1), ((1, 1), 2))
    def test_matches_the_plain_convolution(self, kernel_size, strides):
        x = np.random.default_rng(2).normal(size=(2, 6, 6, 4)).astype("float32")
        fast, plain = _twins(lambda: L.conv2d(7, kernel_size, strides, "torch", "c"), x.shape)
        (y_fast, g_fast), (y_plain, g_plain) = _on_and_off(
            lambda: _gradients(lambda t: L.conv(fast, t, True), x, [fast.kernel]),
            lambda: _gradients(lambda t: L.conv(plain, t, True), x, [plain.kernel]),
        )
        self.assertAllClose(y_fast, y_plain, atol=1e-5)
        for a, b in zip(g_fast, g_plain, strict=True):
            self.assertAllClose(a, b, atol=1e-4, rtol=1e-5)

    def test_1x1_training_form_is_a_matmul_and_inference_a_convolution(self):
        layer = L.conv2d(3, 1, 1, "torch", name="pw")
        x = tf.zeros((1, 4, 4, 2))
        layer(x)
        with acceleration.using("on"):
            training = set(_op_types(lambda t: L.conv(layer, t, True), x))
            inference = set(_op_types(lambda t: L.conv(layer, t, False), x))
        self.assertIn("MatMul", training)
        self.assertNotIn("Conv2D", training)
        self.assertIn("Conv2D", inference)


class PIBConvBranchesTest(test_case.TestCase):
    @parameterized.product(strides=(1, 2), expansion=(2, 3))
    def test_branches_equal_the_depthwise_form(self, strides, expansion):
        x = np.random.default_rng(3).normal(size=(2, 9, 9, 6)).astype("float32")

        def make():
            block = PIBConv(6, 5, strides=strides, expansion=expansion)
            block(x)
            return block

        fast = make()
        plain = make()
        plain.set_weights(fast.get_weights())

        def run(block):
            return _gradients(lambda t: block(t, training=True), x, block.trainable_weights)

        (y_fast, g_fast), (y_plain, g_plain) = _on_and_off(lambda: run(fast), lambda: run(plain))
        self.assertAllClose(y_fast, y_plain, atol=1e-5)
        for a, b in zip(g_fast, g_plain, strict=True):
            self.assertAllClose(a, b, atol=1e-4, rtol=1e-4)


class NetworkTest(test_case.TestCase):
    def test_in_training_graphs_s0_is_preprocessed_once_s1_exists(self):
        # The scheduling kernel `after`: a control dependency on s1.
        cell = cells.Cell(G.PIBCONV, 4, reduction=True, reduction_prev=True)
        rng = np.random.default_rng(14)
        s0 = tf.constant(rng.normal(size=(2, 16, 16, 4)), "float32")
        s1 = tf.constant(rng.normal(size=(2, 8, 8, 6)), "float32")
        graph = tf.function(lambda a, b: cell([a, b], training=True))
        with acceleration.using("on"):
            eager = cell([s0, s1], training=True)
            ops_ = graph.get_concrete_function(s0, s1).graph.get_operations()
            traced = graph(s0, s1)
        gated = [op for op in ops_ if op.type == "Identity" and op.control_inputs]
        self.assertTrue(any(c.name.startswith("b") for op in gated for c in op.control_inputs))
        # A scheduling hint only (drop path off, so both calls see the same numbers).
        self.assertAllClose(traced, eager, atol=1e-5)

    def _network(self):
        return networks.network_cifar(G.PIBCONV, 10, 4, 2, auxiliary=True, image_size=16, seed=0)

    def test_a_training_step_is_the_same_and_the_files_do_not_depend_on_the_switch(self):
        x = np.random.default_rng(13).normal(size=(4, 16, 16, 3)).astype("float32")
        fast = self._network()
        plain = self._network()
        plain.set_weights(fast.get_weights())

        def step(model):
            with tf.GradientTape() as tape:
                outputs = model(x, training=True)
                loss = tf.reduce_sum(outputs["logits"] ** 2) + tf.reduce_sum(
                    outputs["aux_logits"] ** 2
                )
            return loss, tape.gradient(loss, model.trainable_variables)

        (loss_fast, g_fast), (loss_plain, g_plain) = _on_and_off(
            lambda: tf.function(lambda: step(fast))(), lambda: tf.function(lambda: step(plain))()
        )
        self.assertAllClose(loss_fast, loss_plain, rtol=1e-4)
        # Against the largest gradient: some are zero but for rounding (the shift of a
        # BatchNorm that another BatchNorm follows).
        scale = max(float(np.abs(b).max()) for b in g_plain)
        for a, b in zip(g_fast, g_plain, strict=True):
            self.assertAllClose(a, b, atol=1e-4 * scale)
        for a, b in zip(fast.non_trainable_weights, plain.non_trainable_weights, strict=True):
            self.assertAllClose(a, b, atol=1e-5, msg=a.path)
        # What is saved names Keras' layers only, and restores with the switch off.
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "model.keras")
            fast.save(path)
            import zipfile  # noqa: PLC0415

            config = zipfile.ZipFile(path).read("config.json").decode()
            self.assertNotIn("kernels", config)
            runs.RunDir(directory).checkpoints(network=fast).save(1)
            with acceleration.using("off"):
                restored = self._network()
                entry = runs.RunDir(directory).checkpoints(network=restored).restore()
                self.assertEqual(entry["epoch"], 1)
                loaded = keras.saving.load_model(path)
            for model in (restored, loaded):
                self.assertAllClose(
                    model(x, training=False)["logits"], fast(x, training=False)["logits"]
                )
