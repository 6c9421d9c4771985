"""PC-DARTS' partial channels (`--partial_channels=K`): the edge, the edge betas, the
derivation and a search run (pibconv_tf/model/search_network.py, search/run.py)."""

import keras
import numpy as np
import pytest

from pibconv_tf.errors import UserInputError
from pibconv_tf.model import genotypes
from pibconv_tf.model.search_network import (
    MixedOp,
    SearchNetwork,
    build_network,
    channel_shuffle,
    node_softmax,
    set_op_executor,
)
from pibconv_tf.search.config import SearchConfig
from pibconv_tf.search.run import read_alphas, run_search
from tests.test_search_run import TINY


def _images(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_channel_shuffle_is_pc_darts_permutation_in_nhwc():
    x = _images((2, 3, 3, 12))
    # PC-DARTS on NCHW: view(b, g, c / g, h, w) -> transpose(1, 2) -> view(b, c, h, w).
    nchw = x.transpose(0, 3, 1, 2)
    reference = nchw.reshape(2, 4, 3, 3, 3).transpose(0, 2, 1, 3, 4).reshape(2, 12, 3, 3)
    got = keras.ops.convert_to_numpy(channel_shuffle(x, 4))
    np.testing.assert_array_equal(got, reference.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("strides", [1, 2])
def test_an_edge_sends_one_kth_of_its_channels_through_the_operations(strides):
    op = MixedOp(8, strides, "darts", partial_channels=4)
    x = _images((2, 6, 6, 8))
    weights = keras.ops.softmax(keras.ops.convert_to_tensor(_images((8,), 1)))
    got = keras.ops.convert_to_numpy(op(x, weights, training=True))
    # The operations are built on 2 channels (the separable conv's depthwise kernel).
    kernels = [w for w in op.weights if "sep_conv_3x3" in w.path and len(w.shape) == 4]
    assert kernels and all(w.shape[2] in (1, 2) and w.shape[3] in (1, 2) for w in kernels)
    through = keras.ops.convert_to_numpy(op.mixed_sum(x[..., :2], weights, training=True))
    around = x[..., 2:]
    if strides == 2:
        around = around.reshape(2, 3, 2, 3, 2, 6).max(axis=(2, 4))
    expected = keras.ops.convert_to_numpy(channel_shuffle(np.concatenate([through, around], -1), 4))
    # mixed_sum ran twice in training mode: the second call saw other BatchNorm statistics
    # only in the moving averages, which training mode does not use.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _network(partial_channels, steps=2):
    keras.utils.set_random_seed(0)
    network = SearchNetwork(
        3, 4, 3, steps, steps, "darts", seed=0, partial_channels=partial_channels
    )
    return build_network(network, 8)


def test_edge_betas_are_architecture_variables_only_with_partial_channels():
    darts = _network(1)
    assert len(darts.arch_parameters()) == 2
    assert sorted(darts.arch_weights()) == ["normal", "reduce"]
    assert darts.genotype() == darts.genotype()  # derivation runs without edge weights
    network = _network(2)
    betas = network.arch_parameters()[2:]
    assert [tuple(b.shape) for b in betas] == [(5,), (5,)]
    assert len(network.alpha_parameters()) == 2
    assert {id(b) for b in betas}.isdisjoint(id(w) for w in network.weight_parameters())
    weights = network.arch_weights()
    # A softmax per node: node 0 has edges 0-1, node 1 has edges 2-4.
    np.testing.assert_allclose(weights["normal_edges"][:2].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights["normal_edges"][2:].sum(), 1.0, rtol=1e-6)
    clone = SearchNetwork.from_config(network.get_config())
    assert clone.partial_channels == 2


def test_the_genotype_weighs_the_alphas_by_the_edge_weights():
    network = _network(2)
    primitives = network.primitives
    alphas = np.zeros((5, len(primitives)), "float32")
    conv = primitives.index("sep_conv_3x3")
    alphas[2, conv] = alphas[3, conv] = 1.0  # without betas, node 1 takes inputs 0 and 1
    betas = np.zeros(5, "float32")
    betas[4] = 3.0  # ... its edge from node 0 weighs most in its sum
    for variable in network.alpha_parameters():
        variable.assign(alphas)
    network.arch_parameters()[2].assign(betas)
    plain = genotypes.derive_cell(network.arch_weights()["normal"], primitives, 2)
    assert sorted(j for _, j in plain[2:]) == [0, 1]
    derived = network.genotype().normal
    assert 2 in [j for _, j in derived[2:]]
    edges = keras.ops.convert_to_numpy(node_softmax(keras.ops.convert_to_tensor(betas), 2))
    softmax = np.exp(alphas) / np.exp(alphas).sum(-1, keepdims=True)
    assert derived == genotypes.derive_cell(softmax * edges[:, None], primitives, 2)


def test_a_partial_channel_search_records_its_edge_weights_and_resumes(tmp_path):
    config = {**TINY, "partial_channels": 2, "model_dir": str(tmp_path / "pc")}
    run_search({**config, "stop_after_epoch": 1})
    genotype = run_search({**config, "resume": True})
    history = read_alphas(tmp_path / "pc" / "alphas.npz")
    assert np.asarray(history["normal_edges"]).shape == (2, 2)
    assert np.asarray(history["normal"]).shape == (2, 2, 8)
    assert genotype.steps == 1


def test_partial_channels_must_leave_each_operation_an_even_channel_count():
    config = SearchConfig(model_dir="x", init_channels=12, partial_channels=4)
    with pytest.raises(UserInputError, match="divisible by 8"):
        config.validate()
    SearchConfig(model_dir="x", init_channels=16, partial_channels=4).validate()


def test_shared_traces_run_a_whole_partial_channel_edge_as_one_call():
    import tensorflow as tf  # the executor is TensorFlow's

    from pibconv_tf.search.shared_trace import SharedTraces

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        network = _network(2)
        x = keras.random.normal((2, 8, 8, 3), seed=3, dtype="float64")
    finally:
        keras.config.set_dtype_policy(previous)
    sources = [v.value for v in network.trainable_variables]
    statistics = [v.value for v in network.non_trainable_variables]
    start = [v.numpy().copy() for v in statistics]

    def forward_backward():
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(sources)
            loss = tf.reduce_sum(tf.square(network(x, training=True)))
        return loss, tape.gradient(loss, sources)

    plain = forward_backward()
    for variable, value in zip(statistics, start, strict=True):
        variable.assign(value)
    set_op_executor(network, SharedTraces())
    try:
        step = tf.function(forward_backward)
        graph = step.get_concrete_function().graph
        shared = step()
    finally:
        set_op_executor(network, None)
    np.testing.assert_allclose(shared[0], plain[0], rtol=1e-10)
    for got, want in zip(shared[1], plain[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # The split, the bypass, the concatenation and the shuffle run inside each edge's call
    # (15 edges): the step's own graph concatenates only the cells' nodes.
    concatenations = [op for op in graph.get_operations() if op.type == "ConcatV2"]
    assert len(concatenations) < 15
