"""BatchNorm across replicas that see different data (issue 20), on two logical CPUs.

Each script runs in a subprocess: logical devices must be configured before TensorFlow
initialises, and this test process has initialised it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PRELUDE = r"""
import json
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np

from pibconv_tf import distribute, optim

distribute.configure_graph_optimizer("auto")
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
"""

RECONCILE_SCRIPT = (
    _PRELUDE
    + r"""
from pibconv_tf.model import numerics

with mirrored.scope():
    bn = numerics.batch_norm(True, name="bn")
    bn.build((None, 4, 4, 3))
rng = np.random.default_rng(0)
halves = [rng.normal(loc, 1.0, size=(2, 4, 4, 3)).astype("float32") for loc in (-1.0, 3.0)]
data = mirrored.experimental_distribute_values_from_function(
    lambda context: tf.constant(halves[context.replica_id_in_sync_group])
)
mirrored.run(lambda x: bn(x, training=True), args=(data,))
local = lambda v: [np.asarray(t) for t in mirrored.experimental_local_results(v)]
before = {name: local(getattr(bn, name).value) for name in ("moving_mean", "moving_variance")}
count = distribute.reconcile_moving_statistics(bn, mirrored)
after = {name: local(getattr(bn, name).value) for name in before}
print(json.dumps({
    "count": count,
    "before_gap": max(float(np.abs(v[0] - v[1]).max()) for v in before.values()),
    "after_gap": max(float(np.abs(v[0] - v[1]).max()) for v in after.values()),
    "mean_error": max(
        float(np.abs(after[n][0] - (before[n][0] + before[n][1]) / 2).max()) for n in before
    ),
}))
"""
)

SYNC_SCRIPT = (
    _PRELUDE
    + r"""
from pibconv_tf.model import numerics
from pibconv_tf.model.search_network import SearchNetwork, build_network
from pibconv_tf.search.trainer import SearchTrainer

rng = np.random.default_rng(0)
# 2 steps x (train, val) x a global batch of 8 distinct images: each replica gets 4 others.
images = rng.normal(size=(4, 8, 8, 8, 3)).astype("float32")
labels = rng.integers(0, 3, size=(4, 8)).astype("int32")
data = tf.data.Dataset.from_tensor_slices(
    ((images[0::2], labels[0::2]), (images[1::2], labels[1::2]))
)


def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope(), numerics.synchronized_batch_norm():
        net = SearchNetwork(3, 4, 3, steps=1, multiplier=1, search_space="darts", seed=0)
        build_network(net, 8)
        trainer = SearchTrainer(net, order="first", grad_clip=0.5, share_traces=False)
        trainer.compile(optim.TorchSGD(0.05, 0.9), optim.TorchSGD(1.0, 0.0))
    flat = lambda variables: np.concatenate([np.ravel(v.numpy()) for v in variables])
    start = flat(net.weight_parameters()), flat(net.arch_parameters())
    trainer.fit(data, epochs=1, verbose=0)
    stats = flat([v for v in net.non_trainable_variables if "moving_mean" in v.path])
    return start, (flat(net.weight_parameters()), flat(net.arch_parameters()), stats)


start, one = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
_, two = run(mirrored)
print(json.dumps({
    name: {
        "update": float(np.abs(one[i] - start[i]).max()) if i < 2 else 1.0,
        "difference": float(np.abs(two[i] - one[i]).max()),
    }
    for i, name in enumerate(("weights", "alphas", "moving_mean"))
}))
"""
)


def _run(script):
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_moving_statistics_become_the_mean_over_replicas():
    figures = _run(RECONCILE_SCRIPT)
    assert figures["count"] == 2
    assert figures["before_gap"] > 0.1  # each replica had its own statistics (loc -1 vs 3)
    assert figures["after_gap"] == 0.0
    assert figures["mean_error"] < 1e-6


@pytest.mark.slow
def test_synchronized_batch_norm_on_two_replicas_takes_the_steps_of_one_device():
    """Replicas with different halves of each batch: with synchronized BatchNorm they
    normalise by the whole batch's statistics, so they take one device's steps."""
    figures = _run(SYNC_SCRIPT)
    for kind in ("weights", "alphas"):
        assert figures[kind]["update"] > 1e-4, kind
        assert figures[kind]["difference"] < 1e-4 * figures[kind]["update"], kind
    assert figures["moving_mean"]["difference"] < 1e-5
