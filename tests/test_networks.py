"""NetworkCIFAR: the paper's Table 1 parameter counts, structure, saving, drop path."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from pibconv_tf.model import cells, networks
from pibconv_tf.model import genotypes as G
from tests import test_case


def _trainable(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


class NetworkTest(test_case.TestCase):
    def test_parameter_count_matches_pytorch_layout(self):
        # Table 1's exact counts are checked in test_complexity; here the trainable weights
        # of a tiny network, with and without the auxiliary head's own weights.
        plain = networks.network_cifar(G.PIBCONV, 10, 4, 2)
        with_aux = networks.network_cifar(G.PIBCONV, 10, 4, 2, auxiliary=True)
        head = with_aux.get_layer("auxiliary_head")
        self.assertEqual(_trainable(with_aux) - _trainable(head), _trainable(plain))

    def test_reduction_cells(self):
        self.assertEqual(networks.reduction_indices(2), [0, 1])
        self.assertEqual(networks.reduction_indices(8), [2, 5])
        model = networks.network_cifar(G.PIBCONV, 10, 4, 3, image_size=16)
        shapes = [tuple(model.get_layer(f"cell_{i}").output.shape[1:]) for i in range(3)]
        self.assertEqual(shapes, [(16, 16, 16), (8, 8, 32), (4, 4, 64)])
        self.assertEqual(networks.last_cell_name(model), "cell_2")

    def test_auxiliary_head_and_inference_model(self):
        model = networks.network_cifar(G.DARTS_V2, 7, 4, 3, auxiliary=True)
        x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
        outputs = model(x, training=False)
        self.assertEqual(set(outputs), {"logits", "aux_logits"})
        self.assertEqual(tuple(outputs["aux_logits"].shape), (2, 7))
        inference = networks.inference_model(model)
        self.assertAllClose(inference(x, training=False), outputs["logits"])
        # The auxiliary head is training-only: the inference view holds none of its weights.
        self.assertLess(len(inference.weights), len(model.weights))

    @parameterized.parameters("PIBCONV", "DARTS_V2")
    def test_save_load_gives_identical_logits(self, name):
        model = networks.network_cifar(G.NAMED_GENOTYPES[name], 10, 4, 2, auxiliary=True)
        x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
        self.run_model_saving_test(model, x)

    def test_drop_path_is_identity_at_inference_and_drops_samples_in_training(self):
        model = networks.network_cifar(G.PIBCONV, 10, 4, 2, image_size=16)
        self.assertEqual(cells.set_drop_path_rate(model, 0.5), 2)
        x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")
        self.assertAllClose(model(x, training=False), model(x, training=False))
        seed = keras.random.SeedGenerator(0)
        h = np.ones((4000, 2, 2, 3), "float32")
        dropped = np.asarray(cells.drop_path(h, 0.3, seed))
        per_sample = dropped.reshape(4000, -1)
        # Whole samples are zeroed or scaled by 1/(1 - rate); about 30% are zeroed.
        self.assertTrue(np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.7).all(1)))
        self.assertAlmostEqual(float((per_sample == 0).all(1).mean()), 0.3, delta=0.03)
        self.assertAllClose(cells.drop_path(h[:8], 0.0, seed), h[:8])

    def test_training_step_reduces_loss(self):
        model = networks.network_cifar(G.PIBCONV, 2, 4, 2, image_size=8)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
        y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
        model.compile(
            keras.optimizers.Adam(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(x, y, batch_size=8, epochs=15, verbose=0)
        self.assertLess(history.history["loss"][-1], 0.5 * history.history["loss"][0])


class CellFormsTest(test_case.TestCase):
    @parameterized.parameters(False, True)
    def test_activated_inputs_compute_the_same_cell(self, reduction_prev):
        # A network passes each state through the cells' shared ReLU once; the cell then
        # skips its own: the same numbers as the cell applying it to raw states.
        rng = np.random.default_rng(3)
        s0 = rng.normal(size=(2, 16 if reduction_prev else 8, 16 if reduction_prev else 8, 8))
        s1 = rng.normal(size=(2, 8, 8, 12))
        s0, s1 = s0.astype("float32"), s1.astype("float32")
        raw = cells.Cell(G.PIBCONV, 8, reduction=True, reduction_prev=reduction_prev)
        shared = cells.Cell(
            G.PIBCONV, 8, reduction=True, reduction_prev=reduction_prev, activated_inputs=True
        )
        raw([s0, s1])
        shared([s0, s1])
        shared.set_weights(raw.get_weights())
        relu = keras.ops.relu
        for training in (False, True):
            self.assertAllClose(
                shared([relu(s0), relu(s1)], training=training),
                raw([s0, s1], training=training),
                atol=1e-5,
                msg=f"training={training}",
            )
        self.assertTrue(cells.Cell.from_config(shared.get_config()).activated_inputs)

    def test_network_computes_each_relu_once(self):
        model = networks.network_cifar(G.PIBCONV, 10, 4, 3, image_size=16)
        names = [layer.name for layer in model.layers]
        # The stem's and every cell's output but the last (read by the classifier only).
        self.assertEqual(
            [n for n in names if n.endswith("relu")], ["stem_relu", "cell_0_relu", "cell_1_relu"]
        )
        self.assertTrue(all(model.get_layer(f"cell_{i}").activated_inputs for i in range(3)))
        self.assertEqual(networks.stem_channels(model), 12)

    def test_weight_free_operations_of_one_state_are_computed_once(self):
        # PIBCONV's reduction cell average-pools state 0 on three edges: one pooling (two
        # AvgPool ops with the padding count), not three.
        cell = cells.Cell(G.PIBCONV, 4, reduction=True)
        x = tf.zeros((2, 8, 8, 4))
        cell([x, x])
        graph = tf.function(lambda a: cell([a, a], training=True)).get_concrete_function(x).graph
        pools = [op for op in graph.get_operations() if op.type == "AvgPool"]
        self.assertLen(pools, 2)
        # Operations with weights are never shared, even on the same state.
        normal = cells.Cell(G.PIBCONV, 4)
        normal([x, x])
        edge_0, edge_2 = normal.edge_ops[0], normal.edge_ops[2]
        self.assertEqual(normal.edges[0], normal.edges[2])
        self.assertTrue(edge_0.weights and edge_2.weights)

    def test_models_saved_with_the_two_layer_stem_still_report_their_width(self):
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(12, 3, padding="same", name="stem_conv")(inputs)
        legacy = keras.Model(inputs, keras.layers.BatchNormalization(name="stem_bn")(x))
        self.assertEqual(networks.stem_channels(legacy), 12)
