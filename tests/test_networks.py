"""NetworkCIFAR: the paper's Table 1 parameter counts, structure, saving, drop path."""

import keras
import numpy as np
from absl.testing import parameterized

from pibconv_tf import cells, networks
from pibconv_tf import genotypes as G
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
