"""One factory for tf.distribute strategies, shared by search, training and benchmarks."""

import tensorflow as tf

from pibconv_tf.errors import UserInputError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored")


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
