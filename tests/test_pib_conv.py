"""PIBConv: weight count (the paper's Eq. 2 as built), formulations, layer contract."""

import keras
import numpy as np
from absl.testing import parameterized

from pibconv_tf.model.pib_conv import ConvNeXtBlock, PIBConv, set_implementation
from tests import test_case


def _count(layer):
    return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


class PIBConvTest(test_case.TestCase):
    @parameterized.product(channels=(4, 8, 16), kernel=(3, 5, 7), expansion=(2, 3))
    def test_weight_count(self, channels, kernel, expansion):
        c, k, f = channels, kernel, expansion
        affine = PIBConv(c, k, expansion=f, affine=True)
        affine.build((None, 16, 16, c))
        plain = PIBConv(c, k, expansion=f, affine=False)
        plain.build((None, 16, 16, c))
        expected = (f + 1) * c * c + (1 + f) * k * k * c
        self.assertEqual(_count(plain), expected)
        self.assertEqual(_count(affine), expected + 2 * c)

    def test_about_063_of_convnext(self):
        # The paper compares the C^2 coefficients at the same ratio F = 4: (F+1) / 2F = 0.625.
        c, k = 256, 3
        pib = PIBConv(c, k, expansion=4)
        pib.build((None, 8, 8, c))
        convnext = ConvNeXtBlock(c, k, expansion=4)
        convnext.build((None, 8, 8, c))
        self.assertEqual(_count(convnext), 2 * 4 * c * c + k * k * c + 2 * c)
        self.assertAlmostEqual(_count(pib) / _count(convnext), 0.63, delta=0.02)

    @parameterized.parameters(1, 2)
    def test_grouped_and_depthwise_formulations_agree(self, strides):
        x = np.random.default_rng(0).normal(size=(2, 9, 9, 6)).astype("float32")
        layer = PIBConv(6, 5, strides=strides)
        depthwise = layer(x, training=False)
        layer.implementation = "grouped"
        grouped = layer(x, training=False)
        self.assertAllClose(grouped, depthwise, atol=1e-5, rtol=1e-5)

    def test_grouped_kernel_is_keras_grouped_conv_layout(self):
        # The stored kernel drops into keras' own Conv2D(groups=C) with identical results.
        c, k = 4, 3
        layer = PIBConv(c, k)
        layer.build((None, 8, 8, c))
        x = np.random.default_rng(1).normal(size=(1, 8, 8, 2 * c)).astype("float32")
        conv = keras.layers.Conv2D(c, k, padding="same", groups=c, use_bias=False)
        conv.build(x.shape)
        conv.kernel.assign(layer.grouped_kernel)
        self.assertAllClose(layer._grouped_conv(x), conv(x), atol=1e-5)

    def test_set_implementation_switches_nested_layers(self):
        inputs = keras.Input((8, 8, 4))
        outputs = PIBConv(4, 3, name="a")(PIBConv(4, 5, name="b")(inputs))
        model = keras.Model(inputs, outputs)
        self.assertEqual(set_implementation(model, "grouped"), 2)
        self.assertEqual(model.get_layer("a").implementation, "grouped")

    @parameterized.parameters(1, 2)
    def test_layer_contract(self, strides):
        self.run_layer_test(
            PIBConv,
            {"filters": 4, "kernel_size": 3, "strides": strides},
            (2, 8, 8, 4),
            (2, 8 // strides, 8 // strides, 4),
            expected_num_trainable_weights=6,
        )
        self.run_layer_test(
            ConvNeXtBlock,
            {"filters": 4, "kernel_size": 7, "strides": strides, "norm": "ln"},
            (2, 8, 8, 4),
            (2, 8 // strides, 8 // strides, 4),
        )
