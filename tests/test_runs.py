"""Tests for pibconv_tf/runs.py: checkpoints hold every variable of what they save."""

import tempfile

import tensorflow as tf

from pibconv_tf import optim, runs
from pibconv_tf.model import genotypes as G
from pibconv_tf.model import networks
from pibconv_tf.model.search_network import SearchNetwork, build_network


def _checkpointed(**trackables):
    with tempfile.TemporaryDirectory() as directory:
        manager = runs.RunDir(directory).checkpoint_manager(**trackables)
        names = [name for name, _ in tf.train.list_variables(manager.save())]
    return {prefix: sum(name.startswith(f"{prefix}/") for name in names) for prefix in trackables}


def test_a_training_checkpoint_holds_exactly_the_network_and_optimizer_variables():
    network = networks.network_cifar(G.PIBCONV, 10, 4, 2, auxiliary=True, image_size=16)
    optimizer = optim.TorchSGD(0.1, 0.9)
    optimizer.build(network.trainable_variables)
    # The BatchNorm statistics inside the cells' operations are among them (TensorFlow's
    # own object graph of the model misses those: 16 of 104 variables).
    inner = [v for v in network.non_trainable_variables if "edge_" in v.path]
    assert any("moving_mean" in v.path for v in inner)
    counts = _checkpointed(network=network, optimizer=optimizer, epoch=tf.Variable(0))
    assert counts["network"] == len(network.variables)
    assert counts["optimizer"] == len(optimizer.variables)
    assert set(runs.checkpoint_variables(network)) == {v.path for v in network.variables}


def test_a_search_checkpoint_holds_exactly_the_search_network_variables():
    network = build_network(SearchNetwork(10, 4, 3, steps=2, multiplier=2), 8)
    counts = _checkpointed(network=network)
    assert counts["network"] == len(network.variables)
    assert any("alphas_normal" in v.path for v in network.variables)
