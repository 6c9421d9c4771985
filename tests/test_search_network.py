"""Tests for pibconv_tf/model/search_network.py: mixed operations and the one-shot search model."""

import keras
import numpy as np
import pytest

from pibconv_tf.model import operations, search_spaces
from pibconv_tf.model import search_network as network_lib
from pibconv_tf.model.search_network import MixedOp


def tiny_network(search_space="darts", steps=2, **kwargs):
    net = network_lib.SearchNetwork(
        num_classes=3,
        init_channels=4,
        layers=3,
        steps=steps,
        multiplier=steps,
        search_space=search_space,
        seed=1,
        **kwargs,
    )
    return network_lib.build_network(net, 8)


@pytest.fixture(scope="module")
def darts_net():
    return tiny_network()


def test_alphas_are_explicit_and_partition_the_trainable_weights(darts_net):
    arch = darts_net.arch_parameters()
    assert arch[0] is darts_net.alphas_normal and arch[1] is darts_net.alphas_reduce
    num_ops = len(search_spaces.get_search_space("darts").primitives)
    assert tuple(darts_net.alphas_normal.shape) == (network_lib.num_edges(2), num_ops) == (5, 8)
    for alpha in arch:
        values = keras.ops.convert_to_numpy(alpha)
        assert 0 < np.abs(values).max() < 1e-2  # 1e-3 * N(0, 1)
    weights = darts_net.weight_parameters()
    assert not {id(v) for v in weights} & {id(v) for v in arch}
    assert len(weights) + 2 == len(darts_net.trainable_weights)
    assert network_lib.num_edges(4) == 14


def test_forward_shape_and_cells(darts_net):
    logits = darts_net(keras.ops.ones((2, 8, 8, 3)), training=True)
    assert tuple(logits.shape) == (2, 3)
    assert [c.reduction for c in darts_net.cells] == [False, True, True]
    assert [c.reduction_prev for c in darts_net.cells] == [False, False, True]
    assert isinstance(darts_net.cells[2].preprocess0, operations.FactorizedReduce)
    assert not darts_net.cells[2].preprocess0.affine


def test_genotype_of_hand_set_alphas(darts_net):
    primitives = list(search_spaces.get_search_space("darts").primitives)
    col = primitives.index
    normal = np.zeros((5, 8), np.float32)
    normal[:, col("none")] = 10.0  # the strongest everywhere, and never chosen
    normal[0, col("max_pool_3x3")] = 3.0
    normal[1, col("sep_conv_3x3")] = 5.0
    normal[2, col("dil_conv_5x5")] = 1.0  # node 1: edges 2 (input 0), 3 (input 1), 4 (node 0)
    normal[3, col("skip_connect")] = 4.0
    normal[4, col("sep_conv_5x5")] = 2.0
    reduce = np.zeros((5, 8), np.float32)
    reduce[0, col("avg_pool_3x3")] = 1.0
    reduce[1, col("skip_connect")] = 2.0
    reduce[4, col("dil_conv_3x3")] = 3.0
    reduce[2, col("max_pool_3x3")] = 0.5
    darts_net.alphas_normal.assign(normal)
    darts_net.alphas_reduce.assign(reduce)
    genotype = darts_net.genotype()
    assert genotype.normal == (
        ("sep_conv_3x3", 1),
        ("max_pool_3x3", 0),
        ("skip_connect", 1),
        ("sep_conv_5x5", 2),
    )
    assert genotype.reduce == (
        ("skip_connect", 1),
        ("avg_pool_3x3", 0),
        ("dil_conv_3x3", 2),
        ("max_pool_3x3", 0),
    )
    assert genotype.normal_concat == genotype.reduce_concat == (2, 3)
    assert genotype.search_space == "darts"
    weights = darts_net.arch_weights()
    np.testing.assert_allclose(weights["normal"].sum(axis=1), 1.0, rtol=1e-6)


def test_genotype_never_contains_none_and_names_its_space():
    net = tiny_network("pibconv", steps=1)
    net.alphas_normal.assign(np.eye(2, 10, dtype=np.float32) * 5.0)  # "none" wins edge 0
    genotype = net.genotype()
    assert genotype.search_space == "pibconv"
    assert all(op != "none" for op, _ in genotype.normal + genotype.reduce)
    assert genotype.normal_concat == (2,)


def test_mixed_op_is_the_weighted_sum_of_its_operations():
    op = MixedOp(filters=4, strides=1, search_space="darts")
    x = keras.random.normal((2, 6, 6, 4), seed=0)
    primitives = search_spaces.get_search_space("darts").primitives
    one_hot = np.eye(len(primitives), dtype=np.float32)
    skip = op(x, one_hot[primitives.index("skip_connect")], training=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(skip), keras.ops.convert_to_numpy(x))
    zero = op(x, one_hot[primitives.index("none")], training=True)
    assert not np.any(keras.ops.convert_to_numpy(zero))
    # A pooling edge is followed by a non-affine BatchNorm, as in DARTS' MixedOp.
    pooled = op(x, one_hot[primitives.index("max_pool_3x3")], training=True)
    pooled = keras.ops.convert_to_numpy(pooled)
    np.testing.assert_allclose(pooled.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(pooled.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    # Weights mix linearly: w * skip + (1 - w) * max pool.
    weights = 0.3 * one_hot[primitives.index("skip_connect")]
    weights += 0.7 * one_hot[primitives.index("max_pool_3x3")]
    mixed = keras.ops.convert_to_numpy(op(x, weights, training=True))
    np.testing.assert_allclose(mixed, 0.3 * keras.ops.convert_to_numpy(x) + 0.7 * pooled, atol=1e-5)
    assert len(op.candidates) == len(primitives) - 1  # "none" is not computed


def test_config_round_trip_and_strided_mixed_op():
    net = network_lib.SearchNetwork(num_classes=3, init_channels=4, layers=3, steps=1, multiplier=1)
    clone = network_lib.SearchNetwork.from_config(net.get_config())
    assert clone.get_config() == net.get_config()
    assert clone.search_space == "pibconv" and clone.num_layers == 3
    op = MixedOp.from_config(MixedOp(8, 2, "pibconv").get_config())
    weights = keras.ops.softmax(keras.ops.zeros((10,)))
    assert tuple(op(keras.ops.ones((1, 8, 8, 8)), weights).shape) == (1, 4, 4, 8)


def test_alphas_stay_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        net = tiny_network(steps=1)
        logits = net(keras.ops.ones((2, 8, 8, 3)), training=True)
    finally:
        keras.config.set_dtype_policy(previous)
    assert all(alpha.dtype == "float32" for alpha in net.arch_parameters())
    assert logits.dtype == "bfloat16"
    assert np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))).all()


@pytest.mark.parametrize("differentiated", ["all", "alphas", "weights"])
@pytest.mark.parametrize(
    ("inline", "recompute"),
    [(True, False), (False, False), (False, True)],
    ids=["inlined", "noinline", "noinline_recompute"],
)
def test_shared_traces_compute_what_the_layers_compute(inline, recompute, differentiated):
    import tensorflow as tf  # the executor is TensorFlow's; the model code is not

    from pibconv_tf.search.shared_trace import SharedTraces

    # In float64, so that the comparison is not blurred by float32 rounding (BatchNorm over
    # 2 images at 2x2 amplifies it to ~1e-4 of the gradients); the two paths are the same
    # arithmetic and agree to ~1e-14.
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        net = tiny_network()
        x = keras.random.normal((2, 8, 8, 3), seed=3, dtype="float64")
    finally:
        keras.config.set_dtype_policy(policy)
    statistics = net.non_trainable_variables
    start = [v.numpy().copy() for v in statistics]
    # The architecture pass differentiates the alphas only, the weight pass the weights only:
    # each shared function then leaves out the gradients nobody asks for.
    chosen = {
        "all": net.trainable_variables,
        "alphas": net.arch_parameters(),
        "weights": net.weight_parameters(),
    }[differentiated]
    sources = [v.value for v in chosen]

    def forward_backward():
        # All: a tape that watches what the network reads; else what the trainer does.
        with tf.GradientTape(watch_accessed_variables=differentiated == "all") as tape:
            tape.watch(sources)
            logits = net(x, training=True)
            loss = tf.reduce_sum(tf.square(logits))
        return logits, tape.gradient(loss, sources)

    def run(executor, step):
        for variable, value in zip(statistics, start, strict=True):
            variable.assign(value)
        assert network_lib.set_op_executor(net, executor) == 15  # 3 cells x 5 edges
        logits, grads = step()
        return logits.numpy(), [g.numpy() for g in grads], [v.numpy() for v in statistics]

    plain = run(None, forward_backward)
    executor = SharedTraces(inline=inline, recompute=recompute)
    # Inside a tf.function, where TensorFlow inlines the nested calls unless told not to.
    shared = run(executor, tf.function(forward_backward))
    for function in executor.functions.values():
        (concrete,) = function._list_all_concrete_functions()
        assert concrete.function_def.attr["_noinline"].b is (not inline)
    # 15 edges, 5 configurations: C=4 stride 1 (8x8); C=8 stride 2 (8x8) and 1 (4x4);
    # C=16 stride 2 (4x4) and 1 (2x2). Differentiated: (inputs, mixing weights, weights).
    followed = {key.differentiated for key in executor.functions}
    # The edges pass their variables.
    assert {key.by_variables for key in executor.functions} == {True}
    if differentiated == "all":
        assert executor.num_functions == 5
        assert followed == {(True, True, True)}
    elif differentiated == "alphas":
        # The first cell's inputs come from the stem, which no alpha reaches.
        assert followed == {(False, True, False), (True, True, False)}
    else:
        assert followed == {(True, False, True)}
    assert shared[0].dtype == np.float64
    np.testing.assert_allclose(shared[0], plain[0], rtol=1e-10, atol=1e-12)
    for got, want in zip(shared[1] + shared[2], plain[1] + plain[2], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert not np.allclose(plain[2][-1], start[-1])  # the statistics did move


def test_recomputed_traces_keep_only_their_arguments_for_the_backward_pass():
    import tensorflow as tf

    from pibconv_tf.search.shared_trace import SharedTraces

    def kept_for_backward(recompute):
        """Tensors the called forward functions hand to their gradients, and the gradients."""
        keras.utils.set_random_seed(0)
        net = tiny_network(search_space="pibconv")
        x = keras.random.normal((2, 8, 8, 3), seed=3)
        sources = [v.value for v in net.weight_parameters()]
        network_lib.set_op_executor(net, SharedTraces(inline=False, recompute=recompute))

        @tf.function
        def step():
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(sources)
                loss = tf.reduce_sum(tf.square(net(x, training=True)))
            return tape.gradient(loss, sources)

        library = step.get_concrete_function().graph.as_graph_def().library
        kept = set()
        for function in library.function:
            if function.signature.name.startswith("__forward_mixed_op"):
                # What each forward hands its gradient, by the kind of op that made it.
                made_by = {node.name: node.op for node in function.node_def}
                for output in function.signature.output_arg:
                    kept.add(made_by.get(function.ret[output.name].split(":")[0], "argument"))
        grads = step()
        return kept, [g.numpy() for g in grads]

    held, recomputed = kept_for_backward(recompute=True)
    full, stored = kept_for_backward(recompute=False)
    # Recomputed: each forward passes on its arguments and its outputs only; stored: the
    # intermediates of its ten operations.
    assert held == {"argument", "Identity", "IdentityN"}  # IdentityN: its outputs
    assert {"Conv2D", "DepthwiseConv2dNative", "FusedBatchNormV3"} <= full
    for a, b in zip(recomputed, stored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
