"""Tests for pibconv_tf/search/architect.py, adam.py and the trainer's update rules.

The second-order architecture gradient is checked in float64 against central differences of
F(alpha) = L_val(w - xi * (mu * m + grad_w L_train(w, alpha) + wd * w), alpha) along random
unit directions, computed with Keras' `stateless_call` (not the architect's code).

Tolerances: the search network is piecewise smooth (ReLU, max pooling), so both finite
differences must stay inside one smooth piece: the reference steps h = 1e-6 in alpha and the
architect's Hessian-vector product is evaluated with radius r = 1e-6 (DARTS uses r = 0.01, a
perturbation of the weights of norm 0.01, which on this 8x8 toy crosses ReLU kinks and is
only accurate to ~10%). In float64 both then carry truncation errors ~1e-12 and rounding
errors ~1e-16 / 1e-6 = 1e-10, so they must agree to a relative 1e-6.
"""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

from pibconv_tf import optim
from pibconv_tf.model.search_network import SearchNetwork, build_network
from pibconv_tf.optim import TorchAdam
from pibconv_tf.search import architect as architect_lib
from pibconv_tf.search import grouped
from pibconv_tf.search.trainer import SearchTrainer

REPO = pathlib.Path(__file__).resolve().parents[1]
XI, MOMENTUM, WEIGHT_DECAY = 0.5, 0.9, 3e-4  # a large xi makes the second-order term count


def mean_cross_entropy(labels, logits):
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return keras.ops.mean(losses)


@pytest.fixture(scope="module")
def float64_setup():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        keras.utils.set_random_seed(3)
        net = SearchNetwork(3, 4, 3, steps=1, multiplier=1, search_space="darts", seed=3)
        build_network(net, 8)
    finally:
        keras.config.set_dtype_policy(previous)
    assert all(v.dtype == "float64" for v in net.weights)
    rng = np.random.default_rng(0)
    for alpha in net.arch_parameters():  # away from uniform, so the gradient is generic
        alpha.assign(rng.normal(scale=0.5, size=alpha.shape))
    batch = lambda: (  # noqa: E731
        tf.constant(rng.normal(size=(2, 8, 8, 3))),
        tf.constant(rng.integers(0, 3, 2), tf.int32),
    )
    buffers = [tf.constant(rng.normal(scale=0.1, size=v.shape)) for v in net.weight_parameters()]
    return net, batch(), batch(), buffers


def reference_objective(net, train, val, buffers, alphas):
    """F(alphas) through Keras' stateless_call, independent of the Architect."""
    arch_ids = [id(v) for v in net.arch_parameters()]
    weights = net.weight_parameters()
    trainable = net.trainable_variables
    non_trainable = [v.value for v in net.non_trainable_variables]

    def values(weight_values):
        by_id = dict(zip([id(v) for v in weights], weight_values, strict=True))
        by_id.update(zip(arch_ids, alphas, strict=True))
        return [by_id[id(v)] for v in trainable]

    current = [tf.convert_to_tensor(v) for v in weights]
    with tf.GradientTape() as tape:
        tape.watch(current)
        logits, _ = net.stateless_call(values(current), non_trainable, train[0], training=True)
        loss = mean_cross_entropy(train[1], logits)
    grads = tape.gradient(loss, current)
    unrolled = [
        w - XI * (MOMENTUM * m + g + WEIGHT_DECAY * w)
        for w, g, m in zip(current, grads, buffers, strict=True)
    ]
    logits, _ = net.stateless_call(values(unrolled), non_trainable, val[0], training=True)
    return float(mean_cross_entropy(val[1], logits))


def architect_gradient(net, train, val, buffers, order, radius=1e-6):
    architect = architect_lib.Architect(
        net, mean_cross_entropy, order, MOMENTUM, WEIGHT_DECAY, hessian_radius=radius
    )
    grads, _, _ = architect.gradients(train, val, XI, buffers)
    return np.concatenate([np.ravel(g.numpy()) for g in grads])


def test_second_order_gradient_matches_central_differences(float64_setup):
    net, train, val, buffers = float64_setup
    alphas = [tf.convert_to_tensor(a) for a in net.arch_parameters()]
    second = architect_gradient(net, train, val, buffers, "second")
    first = architect_gradient(net, train, val, buffers, "first")
    rng = np.random.default_rng(1)
    h = 1e-6
    for _ in range(2):
        direction = [rng.normal(size=a.shape) for a in alphas]
        norm = np.sqrt(sum(np.sum(d**2) for d in direction))
        direction = [d / norm for d in direction]
        flat = np.concatenate([np.ravel(d) for d in direction])
        sides = [
            reference_objective(
                net,
                train,
                val,
                buffers,
                [a + s * d for a, d in zip(alphas, direction, strict=True)],
            )
            for s in (h, -h)
        ]
        reference = (sides[0] - sides[1]) / (2 * h)
        assert second @ flat == pytest.approx(reference, rel=1e-6, abs=1e-12)
        # The unrolled term is large here: dropping or mis-scaling it would fail.
        assert abs(first @ flat - reference) > 0.05 * abs(reference)


def test_shared_traces_leave_the_discarded_statistics_out_of_the_second_order(float64_setup):
    from pibconv_tf.model.search_network import set_op_executor
    from pibconv_tf.search.shared_trace import SharedTraces

    net, train, val, buffers = float64_setup
    statistics = [v.value for v in net.non_trainable_variables]
    start = [v.numpy().copy() for v in statistics]
    plain = architect_gradient(net, train, val, buffers, "second", radius=1e-3)
    moved = [v.numpy() for v in statistics]  # by the pass at w itself
    for variable, value in zip(statistics, start, strict=True):
        variable.assign(value)
    executor = SharedTraces()
    set_op_executor(net, executor)
    try:
        architect = architect_lib.Architect(
            net, mean_cross_entropy, "second", MOMENTUM, WEIGHT_DECAY, hessian_radius=1e-3
        )
        step = tf.function(lambda: architect.gradients(train, val, XI, buffers)[0])
        graph = step.get_concrete_function().graph
        traced = np.concatenate([np.ravel(g.numpy()) for g in step()])
    finally:
        set_op_executor(net, None)
    # The passes at w' and w+- compute the same numbers without the statistics.
    np.testing.assert_allclose(traced, plain, rtol=1e-9, atol=1e-13)
    by_values = {key: f for key, f in executor.functions.items() if not key.by_variables}
    assert by_values and all(key.discarding for key in by_values)  # all of them discard
    for function in by_values.values():
        (concrete,) = function._list_all_concrete_functions()
        _, updates = concrete.structured_outputs
        assert updates == []
    # Each weight is read once for w' and w+- (and once inside the train pass' calls).
    reads = [op for op in graph.get_operations() if op.type == "ReadVariableOp"]
    assert len(reads) < 2 * len(net.weight_parameters())
    # Only the pass at w itself moved the statistics, as without the shared traces.
    assert not np.allclose(moved[-1], start[-1])
    for variable, want in zip(statistics, moved, strict=True):
        np.testing.assert_allclose(variable.numpy(), want, rtol=1e-9, atol=1e-13)


def test_finite_difference_leaves_the_weights_untouched(float64_setup):
    net, train, val, buffers = float64_setup
    assert architect_lib.Architect(net, mean_cross_entropy, "second").hessian_radius == 0.01
    before = [v.numpy().copy() for v in net.trainable_variables]
    architect_gradient(net, train, val, buffers, "second", radius=0.01)
    for old, new in zip(before, net.trainable_variables, strict=True):
        np.testing.assert_array_equal(old, new.numpy())


def test_torch_adam_matches_pytorch():
    rng = np.random.default_rng(0)
    start = rng.normal(size=(5, 4)).astype(np.float32)
    grads = [rng.normal(scale=1e-3, size=(5, 4)).astype(np.float32) for _ in range(4)]
    variable = keras.Variable(start)
    ours = TorchAdam(3e-4, beta_1=0.5, beta_2=0.999, coupled_weight_decay=1e-3)
    parameter = torch.nn.Parameter(torch.tensor(start))
    theirs = torch.optim.Adam([parameter], lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    for grad in grads:
        ours.apply([tf.constant(grad)], [variable])
        parameter.grad = torch.tensor(grad)
        theirs.step()
    np.testing.assert_allclose(variable.numpy(), parameter.detach().numpy(), rtol=0, atol=1e-7)
    assert np.abs(variable.numpy() - start).max() > 5e-4  # it did move (4 steps of ~lr)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf_function"])
def test_torch_sgd_matches_pytorch(traced):
    # Two variables, so that each finds its own momentum buffer in the fused kernel.
    rng = np.random.default_rng(1)
    starts = [rng.normal(size=shape).astype(np.float32) for shape in ((5, 4), (3,))]
    steps = [[rng.normal(size=s.shape).astype(np.float32) for s in starts] for _ in range(4)]
    variables = [keras.Variable(s) for s in starts]
    ours = optim.TorchSGD(0.1, 0.9, coupled_weight_decay=3e-2)
    ours.build(variables)
    parameters = [torch.nn.Parameter(torch.tensor(s)) for s in starts]
    theirs = torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=3e-2)
    apply = ours.apply
    if traced:
        apply = tf.function(lambda grads: ours.apply(grads, variables))
    for grads in steps:
        tensors = [tf.constant(g) for g in grads]
        apply(tensors) if traced else apply(tensors, variables)
        for parameter, grad in zip(parameters, grads, strict=True):
            parameter.grad = torch.tensor(grad)
        theirs.step()
    for variable, parameter in zip(variables, parameters, strict=True):
        np.testing.assert_allclose(variable.numpy(), parameter.detach().numpy(), atol=1e-6)
        # The buffer the second order reads is PyTorch's, in PyTorch's convention.
        buffer = theirs.state[parameter]["momentum_buffer"].numpy()
        np.testing.assert_allclose(ours.momentum_buffer(variable).numpy(), buffer, atol=1e-6)
    assert np.abs(variables[0].numpy() - starts[0]).max() > 0.1  # it did move


def test_train_step_updates_alphas_then_clipped_weights():
    keras.utils.set_random_seed(0)
    net = build_network(SearchNetwork(3, 4, 3, steps=1, multiplier=1, search_space="darts"), 8)
    trainer = SearchTrainer(net, order="first", grad_clip=1e-3)
    lr = 0.1
    sgd = optim.TorchSGD(lr, 0.9, coupled_weight_decay=3e-4)
    adam = TorchAdam(3e-4, beta_1=0.5, coupled_weight_decay=1e-3)
    trainer.compile(sgd, adam, run_eagerly=True)
    rng = np.random.default_rng(0)
    batch = lambda: (rng.normal(size=(4, 8, 8, 3)).astype("float32"), np.array([0, 1, 2, 0]))  # noqa: E731
    data = (batch(), batch())
    alphas = [a.numpy().copy() for a in net.arch_parameters()]
    weights = [w.numpy().copy() for w in net.weight_parameters()]
    logs = trainer.train_step(data)
    assert float(logs["grad_norm"]) > 1e-3  # the raw norm, before clipping
    # Adam's first step moves every alpha by ~lr (m_hat / sqrt(v_hat) = sign(g)).
    for old, new in zip(alphas, net.arch_parameters(), strict=True):
        np.testing.assert_allclose(np.abs(new.numpy() - old), 3e-4, rtol=0.05)
    # SGD's first step: w -= lr * (clip(g) + wd * w) with ||clip(g)|| = 1e-3.
    clipped = [
        (old - new.numpy()) / lr - 3e-4 * old
        for old, new in zip(weights, net.weight_parameters(), strict=True)
    ]
    assert grouped.global_norm(clipped).numpy() == pytest.approx(1e-3, rel=1e-3)


def test_float16_overflow_skips_the_whole_step_and_halves_the_scale():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        net = build_network(SearchNetwork(3, 4, 3, steps=1, multiplier=1, search_space="darts"), 8)
        trainer = SearchTrainer(net, order="first")
        trainer.compile(
            optim.TorchSGD(0.01, 0.9, coupled_weight_decay=3e-4),
            TorchAdam(3e-4, beta_1=0.5, coupled_weight_decay=1e-3),
            run_eagerly=True,
        )
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
        data = ((x, np.array([0, 1, 2, 0])), (x, np.array([1, 2, 0, 1])))
        snapshot = lambda: [v.numpy().copy() for v in net.trainable_variables]  # noqa: E731
        trainer.loss_scale.scale.assign(2.0**60)  # float16 gradients overflow
        before = snapshot()
        trainer.train_step(data)
        for old, new in zip(before, snapshot(), strict=True):
            np.testing.assert_array_equal(old, new)
        assert trainer.loss_scale.scale.numpy() == 2.0**59
        assert int(trainer.optimizer.iterations.numpy()) == 0
        trainer.loss_scale.scale.assign(2.0**8)
        logs = trainer.train_step(data)
    finally:
        keras.config.set_dtype_policy(previous)
    assert int(trainer.optimizer.iterations.numpy()) == 1
    assert int(trainer.arch_optimizer.iterations.numpy()) == 1
    assert np.isfinite(float(logs["val_loss"])) and np.isfinite(float(logs["grad_norm"]))
    moved = [np.abs(old - new).max() for old, new in zip(before, snapshot(), strict=True)]
    assert min(moved[:2]) > 1e-4  # both alphas took their Adam step


MIRRORED_SCRIPT = r"""
import json
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np

from pibconv_tf import distribute
from pibconv_tf import optim

distribute.configure_graph_optimizer("auto")  # as the apps: no Grappler on a CPU
from pibconv_tf.model.search_network import SearchNetwork, build_network
from pibconv_tf.search.trainer import SearchTrainer

rng = np.random.default_rng(0)
images = rng.normal(size=(4, 4, 8, 8, 3)).astype("float32")  # 2 steps x (train, val) x 4
labels = rng.integers(0, 3, size=(4, 4)).astype("int32")
# Every global batch of 8 is a batch of 4 twice: each replica sees the same 4 images, so
# per-replica BatchNorm statistics are the global batch's and one device must agree.
images, labels = np.concatenate([images, images], 1), np.concatenate([labels, labels], 1)
data = tf.data.Dataset.from_tensor_slices(
    ((images[0::2], labels[0::2]), (images[1::2], labels[1::2]))
)


def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        net = SearchNetwork(3, 4, 3, steps=1, multiplier=1, search_space="darts", seed=0)
        build_network(net, 8)
        # With beta-DARTS' term: added once to the summed gradient, not once per replica.
        trainer = SearchTrainer(net, order="second", grad_clip=0.5, beta_regularization=5.0)
        trainer.compile(
            optim.TorchSGD(0.05, 0.9, coupled_weight_decay=3e-4),
            optim.TorchSGD(1.0, 0.0),  # alphas move by their gradient (Adam would hide its scale)
        )
    flat = lambda variables: np.concatenate([np.ravel(v.numpy()) for v in variables])
    start = flat(net.weight_parameters()), flat(net.arch_parameters())
    trainer.fit(data, epochs=1, verbose=0)
    return start, (flat(net.weight_parameters()), flat(net.arch_parameters()))


start, one = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
_, two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({
    name: {
        "update": float(np.abs(one[i] - start[i]).max()),
        "difference": float(np.abs(two[i] - one[i]).max()),
    }
    for i, name in enumerate(("weights", "alphas"))
}))
"""


@pytest.mark.slow
def test_two_replicas_take_the_steps_of_one_device():
    """Two second-order steps (with the Beta-Decay term) under MirroredStrategy on two logical
    CPUs (a subprocess: logical devices must be configured before TensorFlow initialises)."""
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # Float32 sums in a different order differ by ~1e-7 of the values; a missing or doubled
    # all-reduce, clipping before it, or replicas with different w' or eps would change the
    # updates by a sizeable fraction.
    for kind in ("weights", "alphas"):
        assert figures[kind]["update"] > 1e-4, kind
        assert figures[kind]["difference"] < 1e-4 * figures[kind]["update"], kind
