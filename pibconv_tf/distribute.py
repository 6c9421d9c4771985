"""One factory for tf.distribute strategies, shared by search, training and benchmarks."""

import contextlib
import os

import keras
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
    if keras.backend.backend() == "jax":
        return JaxDistribution(name)
    if _MULTI_WORKER and name != "multi_worker_mirrored":
        raise UserInputError(
            f"TF_CONFIG is set (a multi-worker launch) but --strategy={name}; pass "
            "--strategy=multi_worker_mirrored, or unset TF_CONFIG for a single process."
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
    return start_multi_worker()


_MULTI_WORKER = []


def start_multi_worker():
    """This process's `tf.distribute.MultiWorkerMirroredStrategy` (one per process: the
    cluster comes from TF_CONFIG, and its collectives must be configured before TensorFlow
    runs an operation, so the apps call this first when TF_CONFIG is set)."""
    if not _MULTI_WORKER:
        try:
            _MULTI_WORKER.append(tf.distribute.MultiWorkerMirroredStrategy())
        except (ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"TF_CONFIG does not describe a cluster: {error}") from error
    return _MULTI_WORKER[0]


class JaxDistribution:
    """On Keras' JAX backend, what `get_strategy` returns: data parallelism over the local
    devices with `keras.distribution.DataParallel` (jit shards each batch and all-reduces
    the gradients), with the small interface of a tf.distribute strategy that the runs use.

    "auto" and "mirrored" use every local device (one device: no distribution);
    "one_device" the first; "multi_worker_mirrored" is TensorFlow's and is refused.
    """

    def __init__(self, name):
        import jax  # noqa: PLC0415

        if name == "multi_worker_mirrored":
            raise UserInputError(
                "--strategy=multi_worker_mirrored is TensorFlow's; on JAX run one process "
                "per host with jax.distributed, or use --backend=tensorflow."
            )
        devices = jax.local_devices()
        self.devices = devices[:1] if name == "one_device" else devices
        self.num_replicas_in_sync = len(self.devices)
        self.cluster_resolver = None
        if len(self.devices) > 1:
            ids = [f"{d.platform}:{d.id}" for d in self.devices]
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=ids))

    def scope(self):
        return contextlib.nullcontext()


def is_chief(strategy):
    """Whether this process writes a run's files: the chief of a multi-worker strategy
    (TF_CONFIG's "chief", else worker 0), and every single-process run."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


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


# Machines with at most this many CPU cores and no GPU run one thread per operation and as
# many operations at once as there are cores (`configure_threads`' "auto").
SMALL_CPU_CORES = 4
AUTO_THREADS = -1


def configure_threads(intra_op=AUTO_THREADS, inter_op=AUTO_THREADS):
    """Sets TensorFlow's thread pools for this process, before its runtime starts.

    A search or training step of these networks is hundreds of small operations, many of
    them independent (the edges of a cell, the ten operations of a mixed edge). On a small
    CPU, one thread per operation with as many operations at once as there are cores beats
    TensorFlow's default (every operation spread over all cores): on 2 cores the first- and
    second-order search steps ran 1.40x and 1.43x faster, the 2-, 10- and 20-layer train
    steps 1.03x, 1.11x and 1.09x, Keras batch-1 inference 1.85x; batch-256 inference (large
    operations) was 1.15x slower (docs/performance.md).

    Args:
        intra_op: threads of one operation; -1 = auto (1 on a CPU-only machine with at most
            `SMALL_CPU_CORES` cores, else TensorFlow's choice), 0 = TensorFlow's choice.
        inter_op: operations run at once; -1 = auto (the core count on such a machine, else
            TensorFlow's choice), 0 = TensorFlow's choice.

    Returns:
        (intra_op, inter_op) as the pools now are, 0 where TensorFlow chooses.

    Raises:
        UserInputError: a value below -1, or pools that already started with other sizes.
    """
    for name, value in (("intra_op_threads", intra_op), ("inter_op_threads", inter_op)):
        if value < AUTO_THREADS:
            raise UserInputError(f"--{name} must be -1 (auto), 0 (TensorFlow's) or a count.")
    cores = cpu_cores()
    small = cores <= SMALL_CPU_CORES and not tf.config.list_physical_devices("GPU")
    if intra_op == AUTO_THREADS:
        intra_op = 1 if small else 0
    if inter_op == AUTO_THREADS:
        inter_op = cores if small else 0
    threading = tf.config.threading
    for value, pool in ((intra_op, "intra_op"), (inter_op, "inter_op")):
        current = getattr(threading, f"get_{pool}_parallelism_threads")()
        if value and current != value:
            try:
                getattr(threading, f"set_{pool}_parallelism_threads")(value)
            except RuntimeError as error:
                raise UserInputError(
                    f"TensorFlow's {pool} thread pool already started with {current or 'its'} "
                    f"threads; set it before anything runs ({error})."
                ) from error
    return (
        threading.get_intra_op_parallelism_threads(),
        threading.get_inter_op_parallelism_threads(),
    )


def cpu_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one).

    edge/run_tflite.py counts them the same way on its own: the edge runner imports no
    TensorFlow, so it cannot import this module.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


MOVING_STATISTICS = ("moving_mean", "moving_variance")


def reconcile_moving_statistics(model, strategy=None):
    """Sets every BatchNorm moving mean and variance of `model` to its mean over the replicas.

    Keras creates the moving statistics without an aggregation, so under a strategy each
    replica updates its own copy from its own data and reading one (to evaluate, to save a
    checkpoint) gives replica 0's. Called at each epoch's end (and before an interrupt's
    checkpoint), this makes every replica hold the mean, across workers too. A no-op on one
    replica.

    Returns:
        How many variables were set.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync == 1:
        return 0
    variables = [
        v.value if hasattr(v, "value") else v
        for v in model.non_trainable_variables
        if v.path.rsplit("/", 1)[-1] in MOVING_STATISTICS
    ]
    if not variables:
        return 0
    local = strategy.run(lambda: [tf.identity(v) for v in variables])
    means = strategy.reduce(tf.distribute.ReduceOp.MEAN, local, axis=None)
    for variable, mean in zip(variables, means, strict=True):
        variable.assign(mean)
    return len(variables)


def first_local_batch(model, iterator):
    """The first batch of a fit's `iterator` as this worker's first replica sees it, for
    Keras' symbolic build under a strategy (None without one: Keras then builds lazily).

    Keras (3.15) takes the batch's shapes from `strategy.reduce("MEAN", batch)`, which
    MultiWorkerMirroredStrategy cannot do eagerly (it fails converting the PerReplica
    values); one replica's batch has the same shapes, on every strategy.
    """
    strategy = getattr(model, "_distribute_strategy", None)
    if strategy is None:
        return None
    for _, _, batches in iterator:
        batch = next(batches)
        return tf.nest.map_structure(lambda x: strategy.experimental_local_results(x)[0], batch)
    return None


def reducible_logs(logs):
    """A TensorFlow train or test step's logs, shaped so that Keras can reduce them across
    the workers of a multi-worker strategy: Keras (3.15) reduces every log with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on a scalar (tensorflow#72388), so
    there each log becomes a vector of one value (the mean of equal values is the value).
    Unchanged elsewhere."""
    if not _MULTI_WORKER or tf.distribute.get_strategy() is not _MULTI_WORKER[0]:
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}
