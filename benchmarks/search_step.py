"""Throughput and memory of one search step, for the project's benchmark app.

Reference figures (the brief's measurement of the authors' PyTorch code on a 2-core CPU,
batch 16, 8 layers, C=16, the 10-operation pibconv space, 32x32 images): 0.87 images/s
first order, 0.36 images/s second order.
"""

import resource
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from pibconv_tf import distribute, optim
from pibconv_tf.model import pib_conv as pib_conv_lib
from pibconv_tf.model.search_network import SearchNetwork, build_network
from pibconv_tf.optim import TorchAdam
from pibconv_tf.search.trainer import SearchTrainer


def benchmark_search_step(
    order,
    batch_size,
    layers,
    init_channels,
    search_space,
    steps,
    warmup,
    jit_compile=False,
    nodes=4,
    image_size=32,
    implementation="depthwise",
    share_traces=True,
    inline_traces=False,
    recompute=None,
    graph_optimizer=None,
    seed=0,
    partial_channels=1,
):
    """Times the search train step (architecture + weight update) on random data.

    The step is traced once (`trace_seconds`), run `warmup` times untimed (the first run
    includes graph optimisation: `first_step_seconds`), then `steps` times; throughput is
    training images per second at the median step time. Memory is the process' peak
    resident set size (`resource.getrusage`), which includes TensorFlow itself.

    Args:
        order: "first" or "second".
        batch_size: images per training batch (the validation batch has as many).
        layers, init_channels, search_space: the `SearchNetwork`.
        steps: timed steps.
        warmup: untimed steps after the first.
        jit_compile: compile the step with XLA.
        nodes: intermediate nodes per cell (4 in DARTS).
        image_size: H = W of the random images.
        implementation: PIBConv's grouped convolution, "depthwise" or "grouped".
        share_traces: trace each mixed-operation configuration once (`SharedTraces`).
        inline_traces: inline those traces into the step's graph (False: function calls).
        recompute: recompute the mixed operations in the backward pass (None: wherever
            offered; the record holds what ran).
        graph_optimizer: None keeps the process' setting; "auto", "on" or "off" sets it
            (`distribute.configure_graph_optimizer`, process-wide).
        seed: random seed.
        partial_channels: K of PC-DARTS (1: DARTS' edges).

    Returns:
        A dict of the settings and `images_per_second`, `median_step_seconds`,
        `step_seconds` (all timed steps), `trace_seconds`, `first_step_seconds`,
        `peak_rss_mb`, `resident_mb_after` (the resident set after each stage: "start"
        (TensorFlow and Keras imported), "build", "compile", "trace", "first_step"; None
        where /proc is missing), `params` (weights, without the alphas) and `device`.
    """
    if graph_optimizer is not None:
        distribute.configure_graph_optimizer(graph_optimizer)
    stages = {"start": _resident_mb()}
    keras.utils.set_random_seed(seed)
    network = SearchNetwork(
        10,
        init_channels,
        layers,
        nodes,
        nodes,
        search_space,
        seed=seed,
        partial_channels=partial_channels,
    )
    build_network(network, image_size)
    pib_conv_lib.set_implementation(network, implementation)
    stages["build"] = _resident_mb()
    trainer = SearchTrainer(
        network,
        order=order,
        share_traces=share_traces,
        inline_traces=inline_traces,
        recompute=recompute,
    )
    schedule = optim.EpochCosineDecay(0.0025, 50, 1000, 0.001)
    trainer.compile(
        optim.TorchSGD(schedule, 0.9, coupled_weight_decay=3e-4),
        TorchAdam(3e-4, 0.5, 0.999, coupled_weight_decay=1e-3),
    )
    stages["compile"] = _resident_mb()
    rng = np.random.default_rng(seed)

    def batch():
        x = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
        return tf.constant(x), tf.constant(rng.integers(0, 10, batch_size), tf.int32)

    data = (batch(), batch())
    step = tf.function(trainer.train_step, jit_compile=jit_compile)
    start = time.perf_counter()
    step.get_concrete_function(data)
    trace_seconds = time.perf_counter() - start
    stages["trace"] = _resident_mb()
    start = time.perf_counter()
    _run(step, data)
    first_step_seconds = time.perf_counter() - start
    stages["first_step"] = _resident_mb()
    for _ in range(warmup):
        _run(step, data)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _run(step, data)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "order": order,
        "batch_size": batch_size,
        "layers": layers,
        "init_channels": init_channels,
        "nodes": nodes,
        "partial_channels": partial_channels,
        "search_space": search_space,
        "image_size": image_size,
        "implementation": implementation,
        "jit_compile": jit_compile,
        "share_traces": share_traces,
        "inline_traces": trainer.inline_traces,
        "recompute": trainer.recompute,
        "graph_optimizer": not tf.config.optimizer.get_experimental_options().get(
            "disable_meta_optimizer", False
        ),
        "images_per_second": batch_size / median,
        "median_step_seconds": median,
        "step_seconds": times,
        "trace_seconds": trace_seconds,
        "first_step_seconds": first_step_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "resident_mb_after": stages,
        "params": int(sum(np.prod(v.shape) for v in network.weight_parameters())),
        "device": distribute.device_description(),
    }


def _resident_mb():
    """The process' resident set now, in MB (Linux' /proc), or None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _run(step, data):
    logs = step(data)
    float(logs["loss"])  # waits for the step to finish
