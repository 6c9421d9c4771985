"""One factory for tf.distribute strategies, shared by search, training and benchmarks."""

import tensorflow as tf

from pibconv_tf.errors import UserInputError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored")
GRAPH_OPTIMIZER_MODES = ("auto", "on", "off")


def get_strategy(name="auto", devices=None):
    """The tf.distribute strategy called `name`.

    Args:
        name: "auto" (MirroredStrategy over all GPUs when there are several, else the default
            strategy on the one device), "one_device", "mirrored" (all GPUs, or the given
            `devices`, e.g. two logical CPUs in tests), or "multi_worker_mirrored" (reads
            TF_CONFIG).
        devices: optional device names for "mirrored" and "one_device".

    Returns:
        A `tf.distribute.Strategy`.
    """
    if name not in STRATEGIES:
        raise UserInputError(
            f"Unknown --strategy {name!r}; expected one of {', '.join(STRATEGIES)}."
        )
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    if name == "one_device":
        device = devices[0] if devices else (gpus[0].name if gpus else "/cpu:0")
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.MultiWorkerMirroredStrategy()


def configure_graph_optimizer(mode="auto"):
    """Turns TensorFlow's graph optimiser (Grappler) on or off for this process.

    Grappler rewrites every traced graph before its first run. On a CPU it brings these
    networks no steady-state gain (no biases or fused batch norms to fuse; the search step was
    15% slower with it) but costs minutes of the first step: 456 s against 86 s before the
    first search step of the paper's 8-cell search network. On a GPU it converts
    convolutions to the faster channels-first layout, so keep it there.

    Args:
        mode: "auto" (on when a GPU is visible, off otherwise), "on" or "off". Applies to
            functions traced or first run after the call.

    Returns:
        Whether the optimiser is on.
    """
    if mode not in GRAPH_OPTIMIZER_MODES:
        raise UserInputError(
            f"Unknown --graph_optimizer {mode!r}; expected one of "
            f"{', '.join(GRAPH_OPTIMIZER_MODES)}."
        )
    enabled = mode == "on" or (mode == "auto" and bool(tf.config.list_physical_devices("GPU")))
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not enabled})
    return enabled


def device_description():
    """A short description of the accelerator (or CPU) the run uses, for logs and benchmarks."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{len(gpus)} x {details.get('device_name', 'GPU')}"
    return _cpu_name()


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"
