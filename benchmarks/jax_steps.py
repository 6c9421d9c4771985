"""The search and train steps on Keras' JAX backend, timed without TensorFlow.

Each measurement builds the step `fit` runs (`SearchTrainer.train_step`,
`AuxiliaryTrainer.train_step`: pure functions of the trainer's state), compiles it once
with `jax.jit` (its time is `compile_seconds`), and times single synchronised steps on one
fixed synthetic batch. Only keras, jax, numpy and the package's TensorFlow-free modules
are imported, so `apps.benchmark --backend=jax` runs where JAX alone is installed (the
CUDA build on a GPU). Records have the keys of `benchmarks.measures`' step records, and
`backend`, `compile_seconds` and `peak_device_mb` (what the device's allocator reports;
None on a CPU, where `peak_rss_mb` is the figure).
"""

import time

import jax
import keras
import numpy as np

from benchmarks import harness
from pibconv_tf import optim
from pibconv_tf.model import cells, genotypes, pib_conv
from pibconv_tf.model.numerics import dtype_policy
from pibconv_tf.model.search_network import SearchNetwork, build_network
from pibconv_tf.search.trainer import SearchTrainer
from pibconv_tf.train import config as train_config
from pibconv_tf.train import trainer as trainer_lib


def state_of(trainer):
    """The (trainable, non-trainable, optimizer, metrics) values a JAX train step takes."""
    return (
        [v.value for v in trainer.trainable_variables],
        [v.value for v in trainer.non_trainable_variables],
        [v.value for v in trainer.optimizer.variables],
        [v.value for v in trainer.metrics_variables],
    )


def time_steps(trainer, data, repeats, warmup):
    """Compiles `trainer.train_step` for `data` and times `repeats` steps after `warmup`
    untimed ones (the first of them is the compiled step's first run).

    Returns:
        {"seconds", "cpu_seconds", "first_call_seconds", "compile_seconds"}.
    """
    state = state_of(trainer)
    start = time.perf_counter()
    step = jax.jit(trainer.train_step, donate_argnums=0).lower(state, data).compile()
    compile_seconds = time.perf_counter() - start
    seconds, cpu_seconds = [], []
    for index in range(warmup + repeats):
        start, cpu = time.perf_counter(), time.process_time()
        logs, state = step(state, data)
        jax.block_until_ready(logs["loss"])
        if index == 0:
            first = time.perf_counter() - start
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu)
    if not np.isfinite(float(logs["loss"])):
        raise FloatingPointError(f"the step's loss became {float(logs['loss'])}")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "first_call_seconds": first,
        "compile_seconds": compile_seconds,
    }


def _batch(rng, batch_size, image_size, num_classes):
    images = rng.normal(size=(batch_size, image_size, image_size, 3)).astype("float32")
    return images, rng.integers(0, num_classes, batch_size).astype("int32")


def search_step(spec):
    """DARTS' search step (architecture and weight updates), training images/s."""
    p = spec["params"]
    keras.utils.set_random_seed(p["seed"])
    network = SearchNetwork(
        10, p["init_channels"], p["layers"], p["nodes"], p["nodes"], p["search_space"],
        seed=p["seed"], partial_channels=p.get("partial_channels", 1),
    )  # fmt: skip
    build_network(network, p["image_size"])
    pib_conv.set_implementation(network, p["implementation"])
    trainer = SearchTrainer(
        network, order=p["order"], hessian=p.get("hessian", "finite_difference")
    )
    schedule = optim.EpochCosineDecay(0.0025, 50, 1000, 0.001)
    trainer.compile(
        optim.TorchSGD(schedule, 0.9, coupled_weight_decay=3e-4),
        optim.TorchAdam(3e-4, 0.5, 0.999, coupled_weight_decay=1e-3),
    )
    rng = np.random.default_rng(p["seed"])
    data = tuple(_batch(rng, p["batch_size"], p["image_size"], 10) for _ in range(2))
    timing = time_steps(trainer, data, p["repeats"], p["warmup"])
    params = sum(int(np.prod(v.shape)) for v in network.weight_parameters())
    return [_record("search_step", p, timing, params)]


def train_step(spec):
    """One training step of the derived network (auxiliary head, drop path, TorchSGD)."""
    p = spec["params"]
    mixed = None if p["precision"] == "float32" else p["precision"]
    if mixed and _accelerator() == "CPU":
        reason = f"{mixed} needs a GPU; on a CPU it only adds casts"
        return [{"what": "train_step", "config": p, "status": "skipped", "reason": reason}]
    config = train_config.TrainConfig(
        init_channels=p["init_channels"],
        layers=p["layers"],
        batch_size=p["batch_size"],
        auxiliary_weight=0.4,
        drop_path_prob=0.2,
        mixed_precision=mixed,
        seed=p["seed"],
    ).validate()
    keras.utils.set_random_seed(p["seed"])
    with dtype_policy(mixed):
        genotype = genotypes.load_genotype(p["genotype"])
        network, trainer, _ = trainer_lib.build_trainer(
            config, genotype, p["num_classes"], p["image_size"]
        )
        pib_conv.set_implementation(network, p["implementation"])
        cells.set_drop_path_rate(network, 0.1)  # mid-ramp: drop path does work
        rng = np.random.default_rng(p["seed"])
        data = _batch(rng, p["batch_size"], p["image_size"], p["num_classes"])
        timing = time_steps(trainer, data, p["repeats"], p["warmup"])
    params = sum(int(np.prod(v.shape)) for v in network.trainable_variables)
    return [_record("train_step", p, timing, params)]


def _record(what, params, timing, parameters):
    return {
        "what": what,
        "config": params,
        **harness.timing_figures(timing, params["batch_size"], latency=False),
        "backend": "jax",
        "compile_seconds": timing["compile_seconds"],
        "peak_device_mb": _peak_device_mb(),
        "accelerator": _accelerator(),
        "parameters": parameters,
        "device": _device(),
    }


def _accelerator():
    platform = jax.local_devices()[0].platform
    return "CPU" if platform == "cpu" else platform.upper()


def _device():
    devices = jax.local_devices()
    if devices[0].platform == "cpu":
        return harness.cpu_name()
    return f"{len(devices)} x {devices[0].device_kind}"


def _peak_device_mb():
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


MEASURES = {"search_step": search_step, "train_step": train_step}
