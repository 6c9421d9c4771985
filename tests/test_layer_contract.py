"""Every layer the package registers passes the shared layer test (tests/test_case.py).

Each registered `pibconv_tf>` Keras layer has a case here: symbolic and eager shapes, the
config round trip, serialisation and one training step; registered models round-trip their
configuration. A newly registered class without a case fails `test_every_class_has_a_case`.
"""

import keras
import numpy as np
from absl.testing import parameterized

from pibconv_tf import optim
from pibconv_tf.model import cells, networks, operations, pib_conv, search_spaces
from pibconv_tf.model import genotypes as G
from pibconv_tf.model import numerics as L
from pibconv_tf.model import search_network as search
from pibconv_tf.train import trainer as trainer_lib
from tests import test_case

_PIB_OPS = len(search_spaces.get_search_space("pibconv").primitives)
_EDGES = search.num_edges(2)

# (class, init kwargs, input shape(s), output shape, extra call arguments)
LAYER_CASES = {
    "Zero": (operations.Zero, {"strides": 2}, (2, 8, 8, 4), (2, 4, 4, 4), ()),
    "Identity": (operations.Identity, {}, (2, 8, 8, 4), (2, 8, 8, 4), ()),
    "FactorizedReduce": (
        operations.FactorizedReduce,
        {"filters": 6},
        (2, 8, 8, 4),
        (2, 4, 4, 6),
        (),
    ),
    "ReLUConvBN": (operations.ReLUConvBN, {"filters": 5}, (2, 8, 8, 4), (2, 8, 8, 5), ()),
    "SepConv": (operations.SepConv, {"filters": 4, "strides": 2}, (2, 8, 8, 4), (2, 4, 4, 4), ()),
    "DilConv": (operations.DilConv, {"filters": 4}, (2, 8, 8, 4), (2, 8, 8, 4), ()),
    "Conv7x1_1x7": (operations.Conv7x1_1x7, {"filters": 4}, (2, 8, 8, 4), (2, 8, 8, 4), ()),
    "Pool3x3": (
        operations.Pool3x3,
        {"pool_type": "avg", "strides": 2},
        (2, 8, 8, 4),
        (2, 4, 4, 4),
        (),
    ),
    "PIBConv": (pib_conv.PIBConv, {"filters": 4}, (2, 8, 8, 4), (2, 8, 8, 4), ()),
    "ConvNeXtBlock": (
        pib_conv.ConvNeXtBlock,
        {"filters": 4, "kernel_size": 3},
        (2, 8, 8, 4),
        (2, 8, 8, 4),
        (),
    ),
    "ConvBatchNorm": (
        L.ConvBatchNorm,
        {"filters": 5, "kernel_size": 3},
        (2, 6, 6, 3),
        (2, 6, 6, 5),
        (),
    ),
    "Cell": (
        cells.Cell,
        {"genotype": G.PIBCONV, "filters": 4, "reduction": True},
        [(2, 8, 8, 6), (2, 8, 8, 6)],
        (2, 4, 4, 16),
        (),
    ),
    "AuxiliaryHead": (networks.AuxiliaryHead, {"num_classes": 7}, (2, 8, 8, 12), (2, 7), ()),
    "MixedOp": (
        search.MixedOp,
        {"filters": 4, "strides": 2},
        (2, 8, 8, 4),
        (2, 4, 4, 4),
        (np.full((_PIB_OPS,), 1.0 / _PIB_OPS, "float32"),),
    ),
    "SearchCell": (
        search.SearchCell,
        {"filters": 4, "steps": 2, "multiplier": 2},
        [(2, 8, 8, 6), (2, 8, 8, 6)],
        (2, 8, 8, 8),
        (np.full((_EDGES, _PIB_OPS), 1.0 / _PIB_OPS, "float32"),),
    ),
}


def _registered():
    prefix = "pibconv_tf>"
    return {
        name[len(prefix) :]: cls
        for name, cls in keras.saving.get_custom_objects().items()
        if name.startswith(prefix)
    }


class LayerContractTest(test_case.TestCase):
    @parameterized.named_parameters(sorted((name, name) for name in LAYER_CASES))
    def test_layer(self, name):
        cls, kwargs, input_shape, output_shape, call_args = LAYER_CASES[name]
        self.run_layer_test(cls, kwargs, input_shape, output_shape, call_args=call_args)

    def test_every_class_has_a_case(self):
        covered = set(LAYER_CASES) | {"SearchNetwork", "AuxiliaryTrainer"}
        covered |= {"TorchUniform", "TorchSGD", "TorchAdam", "EpochCosineDecay"}  # below
        self.assertEqual(set(_registered()) - covered, set())

    def test_models_round_trip_their_configuration(self):
        network = search.build_network(search.SearchNetwork(10, 4, 3, steps=2, multiplier=2), 8)
        clone = search.SearchNetwork.from_config(network.get_config())
        self.assertEqual(clone.get_config(), network.get_config())
        model = networks.network_cifar(G.PIBCONV, 10, 4, 2, auxiliary=True, image_size=16)
        trainer = trainer_lib.AuxiliaryTrainer(model, 0.4)
        revived = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(trainer)
        )
        self.assertEqual(revived.auxiliary_weight, 0.4)
        self.run_model_saving_test(model, np.zeros((1, 16, 16, 3), "float32"))

    def test_initialiser_optimisers_and_schedule_round_trip(self):
        for obj in (
            L.TorchUniform(depthwise=True, seed=3),
            optim.TorchSGD(0.1, 0.8, coupled_weight_decay=1e-4),
            optim.TorchAdam(3e-4, 0.5, coupled_weight_decay=1e-3),
            optim.EpochCosineDecay(0.025, 10, 5, 0.001),
        ):
            revived = keras.saving.deserialize_keras_object(
                keras.saving.serialize_keras_object(obj)
            )
            self.assertIsInstance(revived, type(obj))
            self.assertEqual(revived.get_config(), obj.get_config())
