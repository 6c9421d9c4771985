"""Every operation of every search space: shapes, serialization, training, PyTorch parity."""

import keras
import numpy as np
import pytest
from absl.testing import parameterized

from pibconv_tf.model import numerics as L
from pibconv_tf.model import operations, search_spaces
from tests import test_case, torch_reference

_SPACE_OPS = [
    (f"{space}_{op}_s{strides}", space, op, strides)
    for space, definition in search_spaces.SEARCH_SPACES.items()
    for op in definition.primitives
    for strides in (1, 2)
]


def _randomize_norms(op, rng):
    """Gives BatchNorm non-trivial moving statistics so inference-mode parity means something."""
    for weight in op.weights:
        if "moving_variance" in weight.path:
            weight.assign(rng.uniform(0.5, 2.0, weight.shape).astype("float32"))
        elif "moving_mean" in weight.path or "gamma" in weight.path or "beta" in weight.path:
            weight.assign(rng.normal(0, 0.5, weight.shape).astype("float32"))


class OpsTest(test_case.TestCase):
    @parameterized.named_parameters(_SPACE_OPS)
    def test_op_matches_pytorch(self, space, op_name, strides):
        filters, size = 6, 9  # an odd size exercises the padding of stride-2 grids
        op = operations.make_op(op_name, filters, strides, affine=True, search_space=space)
        x = np.random.default_rng(1).normal(size=(2, size, size, filters)).astype("float32")
        op(x)
        _randomize_norms(op, np.random.default_rng(2))
        for training in (False, True):
            expected = torch_reference.reference(op, torch_reference.to_torch(x), training)
            actual = op(x, training=training)
            self.assertAllClose(
                actual,
                torch_reference.to_nhwc(expected),
                atol=2e-5,
                rtol=2e-4,
                msg=f"{op_name} stride {strides} training={training}",
            )
        expected_size = (size + strides - 1) // strides
        self.assertEqual(tuple(actual.shape), (2, expected_size, expected_size, filters))

    @parameterized.named_parameters(_SPACE_OPS)
    def test_op_layer_contract(self, space, op_name, strides):
        op = operations.make_op(op_name, 4, strides, affine=False, search_space=space)
        size = 8 // strides
        self.run_layer_test(type(op), op.get_config(), (2, 8, 8, 4), (2, size, size, 4))

    def test_affine_false_has_no_norm_parameters(self):
        op = operations.make_op("sep_conv_3x3", 4, 1, affine=False, search_space="darts")
        op(np.zeros((1, 8, 8, 4), "float32"))
        # 2 depthwise + 2 pointwise kernels, no gamma/beta.
        self.assertLen(op.trainable_weights, 4)

    def test_max_pool_never_picks_padding(self):
        pool = operations.Pool3x3("max", strides=2)
        x = -np.ones((1, 4, 4, 1), "float32")  # all negative: a zero pad would win
        self.assertAllClose(pool(x), -np.ones((1, 2, 2, 1)))

    def test_avg_pool_excludes_padding_from_count(self):
        pool = operations.Pool3x3("avg", strides=2)
        self.assertAllClose(pool(np.ones((1, 5, 5, 1), "float32")), np.ones((1, 3, 3, 1)))

    def test_stride_two_grid_is_symmetric(self):
        # A centred impulse stays centred under a stride-2 3x3 box filter on a 5x5 grid.
        op = operations.make_op("avg_pool_3x3", 1, 2, affine=True, search_space="darts")
        x = np.zeros((1, 5, 5, 1), "float32")
        x[0, 2, 2, 0] = 9.0
        y = np.asarray(op(x))[0, :, :, 0]
        self.assertAllClose(y, y[::-1, ::-1])

    def test_gelu_is_exact_erf(self):
        x = keras.ops.convert_to_tensor([-1.5, 0.3, 2.0])
        from math import erf, sqrt

        expected = [v * 0.5 * (1 + erf(v / sqrt(2))) for v in (-1.5, 0.3, 2.0)]
        self.assertAllClose(L.activation(x, "gelu"), expected, atol=1e-7)

    def test_batch_norm_uses_pytorch_numerics(self):
        bn = L.batch_norm(True, "bn")
        self.assertEqual((bn.epsilon, bn.momentum), (1e-5, 0.9))

    def test_torch_uniform_bounds(self):
        conv = L.TorchUniform()((3, 3, 8, 16))
        depthwise = L.TorchUniform(depthwise=True)((5, 5, 8, 1))
        self.assertLessEqual(float(np.abs(conv).max()), 1 / np.sqrt(72))
        self.assertGreater(float(np.abs(conv).max()), 0.9 / np.sqrt(72))
        self.assertLessEqual(float(np.abs(depthwise).max()), 1 / np.sqrt(25))
        self.assertGreater(float(np.abs(depthwise).max()), 0.8 / np.sqrt(25))

    def test_search_space_definitions(self):
        pib = search_spaces.get_search_space("pibconv").primitives
        self.assertEqual(
            pib,
            (
                "none",
                "skip_connect",
                "pib_conv_3x3",
                "pib_conv_5x5",
                "pib_conv_7x7",
                "dil_conv_3x3",
                "dil_conv_5x5",
                "conv_7x1_1x7",
                "max_pool_3x3",
                "avg_pool_3x3",
            ),
        )
        self.assertLen(search_spaces.get_search_space("darts").primitives, 8)
        self.assertEqual(search_spaces.get_search_space("darts_gelu_ln").norm, "ln")

    def test_each_space_says_its_activations_and_pool_norm(self):
        # The released PIBConv code: ReLU in dil/7x1-1x7 convs, pools alone on search edges.
        pibconv = search_spaces.get_search_space("pibconv")
        self.assertEqual(pibconv.activation_of("dil_conv_5x5"), "relu")
        self.assertEqual(pibconv.activation_of("conv_7x1_1x7"), "relu")
        self.assertIsNone(pibconv.activation_of("pib_conv_3x3"))  # GELU inside the block
        self.assertFalse(pibconv.pool_batch_norm)
        # The paper's literal reading, and what `pibconv` built before.
        literal = search_spaces.get_search_space("pibconv_gelu")
        self.assertEqual(literal.primitives, pibconv.primitives)
        self.assertEqual(literal.activation_map(), {"dil_conv": "gelu", "conv_7x1_1x7": "gelu"})
        self.assertTrue(literal.pool_batch_norm)
        self.assertEqual(search_spaces.LEGACY_SPACE_MEANING, {"pibconv": "pibconv_gelu"})
        darts = search_spaces.get_search_space("darts")
        self.assertEqual(darts.activation_map(), {"sep_conv": "relu", "dil_conv": "relu"})
        self.assertTrue(darts.pool_batch_norm)
        self.assertEqual(
            search_spaces.get_search_space("darts_gelu").activation_of("sep_conv_3x3"), "gelu"
        )
        for name, expected in (("pibconv", "relu"), ("pibconv_gelu", "gelu")):
            op = operations.make_op("dil_conv_3x3", 4, 1, True, search_space=name)
            self.assertEqual(op.activation, expected)
        override = operations.make_op(
            "dil_conv_3x3", 4, 1, True, search_space="pibconv", activations={"dil_conv": "gelu"}
        )
        self.assertEqual(override.activation, "gelu")

    def test_unknown_names_fail_clearly(self):
        with pytest.raises(ValueError, match="Unknown search space 'nope'"):
            search_spaces.get_search_space("nope")
        with pytest.raises(ValueError, match="'pib_conv_3x3' is not in search space 'darts'"):
            operations.make_op("pib_conv_3x3", 4, 1, True, search_space="darts")


@pytest.mark.parametrize("size", [8, 7])
def test_factorized_reduce_same_numbers_with_unknown_spatial_size(size):
    import tensorflow as tf  # the layer is backend-agnostic; this test traces it

    layer = operations.FactorizedReduce(6)
    layer.build((2, size, size, 5))
    _randomize_norms(layer, np.random.default_rng(0))
    x = tf.constant(np.random.default_rng(1).normal(size=(2, size, size, 5)), tf.float32)

    def forward_and_gradients(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = layer(inputs, training=False)
            loss = tf.reduce_sum(y * y)
        return [y, *tape.gradient(loss, [inputs, *layer.trainable_variables])]

    static = forward_and_gradients(x)  # eager: known sizes, the reshape + split form
    dynamic = tf.function(
        forward_and_gradients, input_signature=[tf.TensorSpec((None, None, None, 5))]
    )(x)  # traced without sizes: the strided-slice form
    assert static[0].shape == (2, (size + 1) // 2, (size + 1) // 2, 6)
    for a, b in zip(static, dynamic, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
