"""Our networks against the authors' released PyTorch code, given the same weights.

The derived networks DARTS_V2 and PIBCONV (2, 3, 5 and 8 cells, auxiliary head on) and the
search networks of the `pibconv` and `darts` spaces compute the logits of
`tests/authors_code.py` (the released code re-stated) within 1e-4 relative in float32, in
evaluation and training mode, with random BatchNorm statistics; in float64 their gradients
with respect to the input, every weight and the alphas agree.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

from pibconv_tf.model import genotypes as G
from pibconv_tf.model import networks, operations, search_spaces
from pibconv_tf.model.search_network import MixedOp, SearchNetwork, build_network
from tests import authors_code

_IMAGE = 32  # the auxiliary head of the released code assumes an 8x8 map: 32x32 images
_CHANNELS = 4


def _randomize_statistics(model, rng):
    """Random moving statistics, scales and shifts: inference parity then means something."""
    for variable in model.weights:
        path = variable.path
        if "moving_variance" in path:
            variable.assign(rng.uniform(0.5, 2.0, variable.shape))
        elif any(part in path for part in ("moving_mean", "gamma", "beta")):
            variable.assign(rng.normal(0.0, 0.3, variable.shape) + ("gamma" in path))


def _relative(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def _network_pair(name, layers, dtype, inplace_aux_relu=False):
    with _policy(dtype):
        model = networks.network_cifar(
            G.NAMED_GENOTYPES[name],
            num_classes=10,
            init_channels=_CHANNELS,
            layers=layers,
            auxiliary=True,
            image_size=_IMAGE,
            seed=0,
        )
    _randomize_statistics(model, np.random.default_rng(layers))
    reference = authors_code.NetworkCIFAR(
        _CHANNELS, 10, layers, True, G.NAMED_GENOTYPES[name], inplace_aux_relu=inplace_aux_relu
    )
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    return model, reference, authors_code.bind_network(model, reference, torch_dtype)


@contextlib.contextmanager
def _policy(name):
    """The dtype policy and float type (which `keras.Input` takes) for a block."""
    previous = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_dtype_policy(name)
    keras.config.set_floatx(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous[0])
        keras.config.set_floatx(previous[1])


def _images(dtype, seed=0):
    return np.random.default_rng(seed).normal(size=(2, _IMAGE, _IMAGE, 3)).astype(dtype)


def _nchw(x):
    return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("layers", [2, 3, 5, 8])
@pytest.mark.parametrize("name", ["DARTS_V2", "PIBCONV"])
def test_derived_network_logits_match_the_authors(name, layers):
    model, reference, _ = _network_pair(name, layers, "float32")
    x = _images("float32")
    reference.eval()
    with torch.no_grad():
        expected, _ = reference(_nchw(x))
    actual = model(x, training=False)["logits"]
    assert _relative(actual, expected) < 1e-4, "evaluation mode"
    reference.train()
    with torch.no_grad():
        expected, expected_aux = reference(_nchw(x))
    outputs = model(x, training=True)
    assert _relative(outputs["logits"], expected) < 1e-4, "training mode"
    assert _relative(outputs["aux_logits"], expected_aux) < 1e-4, "auxiliary head"


def _torch_gradients(reference, binding, x, cotangents):
    inputs = _nchw(x).requires_grad_(True)
    outputs = reference(inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((o * torch.tensor(c)).sum() for o, c in zip(outputs, cotangents, strict=True))
    loss.backward()
    return inputs.grad.numpy().transpose(0, 2, 3, 1)


def _keras_gradients(call, variables, x, cotangents):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = call(x)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        loss = sum(tf.reduce_sum(o * c) for o, c in zip(outputs, cotangents, strict=True))
    grads = tape.gradient(loss, [x, *[v.value for v in variables]])
    return grads[0].numpy(), [g.numpy() for g in grads[1:]]


def _compare_weight_gradients(binding, keras_grads_by_id):
    checked = 0
    for variable, tensor, permutation in binding.pairs:
        if not variable.trainable:
            continue
        expected = tensor.grad.numpy()
        actual = binding.to_torch(keras_grads_by_id[id(variable)], permutation).numpy()
        assert _relative(actual, expected) < 1e-8, variable.path
        checked += 1
    return checked


@pytest.mark.parametrize("layers", [2, 3, 5, 8])
@pytest.mark.parametrize("name", ["DARTS_V2", "PIBCONV"])
def test_derived_network_gradients_match_the_authors_in_float64(name, layers):
    model, reference, binding = _network_pair(name, layers, "float64")
    reference.train()
    x = _images("float64", seed=1)
    rng = np.random.default_rng(2)
    cotangents = (rng.normal(size=(2, 10)), rng.normal(size=(2, 10)))
    expected_dx = _torch_gradients(reference, binding, x, cotangents)

    def call(images):
        outputs = model(images, training=True)
        return outputs["logits"], outputs["aux_logits"]

    variables = model.trainable_variables
    dx, grads = _keras_gradients(call, variables, x, cotangents)
    assert _relative(dx, expected_dx) < 1e-8
    by_id = {id(v): g for v, g in zip(variables, grads, strict=True)}
    assert _compare_weight_gradients(binding, by_id) == len(variables)


def test_the_authors_inplace_auxiliary_relu_changes_their_training_logits():
    """Documents the released code's quirk (README): at 2 layers its auxiliary head's
    in-place ReLU rewrites the last cell's output before the classifier pools it; at 5
    layers the head sits on an earlier cell and changes nothing."""
    x = _images("float32")
    for layers, differs in ((2, True), (5, False)):
        model, quirky, _ = _network_pair("PIBCONV", layers, "float32", inplace_aux_relu=True)
        quirky.train()
        with torch.no_grad():
            expected, _ = quirky(_nchw(x))
        gap = _relative(model(x, training=True)["logits"], expected)
        assert (gap > 1e-2) if differs else (gap < 1e-4), (layers, gap)


def _search_pair(space, dtype):
    with _policy(dtype):
        network = SearchNetwork(
            num_classes=10, init_channels=_CHANNELS, layers=5, search_space=space, seed=0
        )
        build_network(network, 16)
    rng = np.random.default_rng(3)
    _randomize_statistics(network, rng)
    for alphas in network.arch_parameters():
        alphas.assign(rng.normal(size=alphas.shape))
    primitives = network.primitives
    reference = authors_code.SearchNetwork(
        _CHANNELS,
        10,
        5,
        primitives=primitives,
        pool_batch_norm=space != "pibconv",  # the released PIBConv MixedOp: pools alone
    )
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    binding = authors_code.bind_search_network(network, reference, torch_dtype)
    return network, reference, binding


@pytest.mark.parametrize("space", ["pibconv", "darts"])
def test_search_network_logits_match_the_authors(space):
    network, reference, _ = _search_pair(space, "float32")
    x = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype("float32")
    for training in (False, True):
        reference.train(training)
        with torch.no_grad():
            expected = reference(_nchw(x))
        actual = network(x, training=training)
        assert _relative(actual, expected) < 1e-4, f"training={training}"


@pytest.mark.parametrize("space", ["pibconv", "darts"])
def test_search_network_gradients_match_the_authors_in_float64(space):
    network, reference, binding = _search_pair(space, "float64")
    reference.train()
    x = np.random.default_rng(5).normal(size=(2, 16, 16, 3))
    cotangents = (np.random.default_rng(6).normal(size=(2, 10)),)
    expected_dx = _torch_gradients(reference, binding, x, cotangents)
    variables = network.trainable_variables  # weights and alphas
    dx, grads = _keras_gradients(
        lambda images: network(images, training=True), variables, x, cotangents
    )
    assert _relative(dx, expected_dx) < 1e-8
    by_id = {id(v): g for v, g in zip(variables, grads, strict=True)}
    checked = _compare_weight_gradients(binding, by_id)
    assert checked == len(variables)
    alpha_ids = {id(v) for v in network.arch_parameters()}
    alpha_pairs = [p for p in binding.pairs if id(p[0]) in alpha_ids]
    assert len(alpha_pairs) == 2 and all(p[1].grad.abs().sum() > 0 for p in alpha_pairs)


_PIBCONV_OPS = [
    (op, strides) for op in search_spaces.SEARCH_SPACES["pibconv"].primitives for strides in (1, 2)
]


@pytest.mark.parametrize(("op_name", "strides"), _PIBCONV_OPS)
def test_pibconv_space_operations_are_the_released_operations(op_name, strides):
    """Each op as `OPS[name](C, stride, affine)` of the released code builds it (ReLU in
    DilConv and conv_7x1_1x7, GELU only inside PseudoInvBn), an odd size included."""
    op = operations.make_op(op_name, 6, strides, affine=True, search_space="pibconv")
    x = np.random.default_rng(7).normal(size=(2, 9, 9, 6)).astype("float32")
    op(x)
    _randomize_statistics(op, np.random.default_rng(8))
    reference = authors_code.make_op(op_name, 6, strides, True)
    binding = authors_code.Binding(torch.float32)
    authors_code.bind_op(binding, op, reference)
    binding.load()
    for training in (False, True):
        reference.train(training)
        with torch.no_grad():
            expected = reference(_nchw(x)).numpy().transpose(0, 2, 3, 1)
        assert _relative(op(x, training=training), expected) < 1e-4, f"training={training}"


@pytest.mark.parametrize(("space", "strides"), [("pibconv", 1), ("pibconv", 2), ("darts", 2)])
def test_mixed_op_is_the_released_mixed_op(space, strides):
    """The PIBConv MixedOp sums the pools as they are; DARTS' normalises them first."""
    op = MixedOp(6, strides, search_space=space)
    x = np.random.default_rng(9).normal(size=(2, 8, 8, 6)).astype("float32")
    primitives = op.primitives
    weights = np.random.default_rng(10).dirichlet(np.ones(len(primitives))).astype("float32")
    op(x, weights)
    reference = authors_code.MixedOp(6, strides, primitives, pool_batch_norm=space == "darts")
    binding = authors_code.Binding(torch.float32)
    authors_code.bind_mixed_op(binding, op, reference)
    binding.load()
    reference.train()
    with torch.no_grad():
        expected = reference(_nchw(x), torch.tensor(weights)).numpy().transpose(0, 2, 3, 1)
    assert _relative(op(x, weights, training=True), expected) < 1e-4
    pooled_norms = [norm for _, name, norm in _named(op) if "pool" in name and norm is not None]
    assert len(pooled_norms) == (2 if space == "darts" else 0)


def _named(op):
    return [(column, op.primitives[column], norm) for column, _, norm in op.candidates]


def test_the_restated_genotype_is_ours():
    ours = G.PIBCONV
    theirs = authors_code.PIBCONV
    assert [tuple(edge) for edge in theirs.normal] == list(ours.normal)
    assert [tuple(edge) for edge in theirs.reduce] == list(ours.reduce)
    assert tuple(theirs.normal_concat) == ours.normal_concat
    assert tuple(theirs.reduce_concat) == ours.reduce_concat


def test_drop_path_in_the_restatement_drops_whole_samples():
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 2, 3)
    dropped = authors_code.drop_path(x, 0.3).reshape(4000, -1)
    zero = (dropped == 0).all(1)
    assert torch.all(zero | torch.isclose(dropped, torch.tensor(1 / 0.7)).all(1))
    assert abs(float(zero.float().mean()) - 0.3) < 0.03
