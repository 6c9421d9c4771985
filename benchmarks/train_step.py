"""Training throughput of a derived network: the step `training.train` runs, timed alone.

Example:
```python
stats = benchmark_train_step("PIBCONV", layers=2, init_channels=36, batch_size=32,
                             steps=10, warmup=3)
stats["images_per_second"]  # the median step's throughput
```
"""

import time

import keras
import numpy as np
import tensorflow as tf

from pibconv_tf import distribute
from pibconv_tf.model import cells, genotypes
from pibconv_tf.model.pib_conv import set_implementation
from pibconv_tf.train import callbacks as train_callbacks
from pibconv_tf.train import config as train_config
from pibconv_tf.train import trainer as trainer_lib


def benchmark_train_step(
    genotype,
    layers,
    init_channels=36,
    batch_size=32,
    steps=10,
    warmup=3,
    jit_compile=False,
    mixed_precision=None,
    auxiliary=True,
    image_size=32,
    num_classes=10,
    implementation="depthwise",
    seed=0,
):
    """Times `AuxiliaryTrainer.train_step` (forward, auxiliary loss, backward, TorchSGD with
    clipping and weight decay, drop path active) on random images, one synchronised step
    at a time, after `warmup` untimed steps (the first one traces and compiles).

    Args:
        genotype: a `Genotype`, a genotype name or a genotype.json path.
        layers, init_channels: the network (`networks.network_cifar`).
        batch_size: images per step.
        steps: timed steps; the median gives the throughput.
        warmup: untimed steps first (at least 1: the first step traces and compiles).
        jit_compile: compile the step with XLA.
        mixed_precision: None, "mixed_float16" or "mixed_bfloat16".
        auxiliary: train with the auxiliary head (weight 0.4) as the recipe does.
        image_size, num_classes: the input and classifier sizes.
        implementation: PIBConv's grouped convolution, "depthwise" or "grouped".
        seed: initialisation and data seed.

    Returns:
        A dict: images_per_second (median step), seconds_per_step (median), step_seconds
        (all timed steps), cpu_seconds_per_step (median process CPU time: steadier than
        wall time on a shared machine), first_step_seconds (tracing and graph optimisation
        included), the arguments, the parameter count and the device.
    """
    name = genotype if isinstance(genotype, str) else _name(genotype)
    if isinstance(genotype, str):
        genotype = genotypes.load_genotype(genotype)
    config = train_config.TrainConfig(
        init_channels=init_channels,
        layers=layers,
        batch_size=batch_size,
        auxiliary_weight=0.4 if auxiliary else 0.0,
        drop_path_prob=0.2,
        mixed_precision=mixed_precision,
        jit_compile=jit_compile,
        seed=seed,
    ).validate()
    if warmup < 1 or steps < 1:
        raise ValueError(f"warmup and steps must be >= 1, got {warmup} and {steps}.")
    keras.utils.set_random_seed(seed)
    with train_callbacks.dtype_policy(mixed_precision):
        network, trainer, _ = trainer_lib.build_trainer(config, genotype, num_classes, image_size)
        set_implementation(network, implementation)
        cells.set_drop_path_rate(network, 0.1)  # mid-ramp: drop path does work
        step = tf.function(trainer.train_step, jit_compile=jit_compile)
        rng = np.random.default_rng(seed)
        images = tf.constant(rng.normal(size=(batch_size, image_size, image_size, 3)), "float32")
        labels = tf.constant(rng.integers(0, num_classes, batch_size), "int32")
        samples = np.array([_timed(step, images, labels) for _ in range(warmup + steps)])
    times, cpu_times = samples[:, 0], samples[:, 1]
    timed = times[warmup:]
    median = float(np.median(timed))
    return {
        "genotype": name,
        "layers": layers,
        "init_channels": init_channels,
        "batch_size": batch_size,
        "jit_compile": jit_compile,
        "mixed_precision": mixed_precision,
        "auxiliary": auxiliary,
        "implementation": implementation,
        "params": int(sum(np.prod(v.shape) for v in network.trainable_variables)),
        "images_per_second": batch_size / median,
        "seconds_per_step": median,
        "step_seconds": [round(float(t), 5) for t in timed],
        "cpu_seconds_per_step": float(np.median(cpu_times[warmup:])),
        "first_step_seconds": float(times[0]),
        "device": distribute.device_description(),
    }


def _timed(step, images, labels):
    start, cpu = time.perf_counter(), time.process_time()
    logs = step((images, labels))
    float(logs["loss"])  # waits for the step
    return time.perf_counter() - start, time.process_time() - cpu


def _name(genotype):
    names = [name for name, known in genotypes.NAMED_GENOTYPES.items() if known == genotype]
    return names[0] if names else "custom"
