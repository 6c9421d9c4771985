"""The flags several apps share (each defined once, here) and the apps' error handling.

Apps are thin absl binaries: flags -> a config -> one library call. An app defines the
shared flags it uses with `define(...)` at import, next to its own, so that its `--help`
lists only flags it reads; `define` makes each flag once per process. Tests run apps in
subprocesses, never by importing two app modules into one process.
"""

import atexit
import logging
import os
import sys
import threading
import types

# Before TensorFlow is imported by anything: keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The lines TensorFlow's C++ runtime prints when it starts on a machine (TF_CPP_MIN_LOG_LEVEL
# no longer silences them in 2.21). Users read them as errors; they say nothing about the
# run. Any other line reaches stderr as it is.
_STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
    "failed call to cuInit",
    "Unable to register cuDNN factory",
    "Unable to register cuBLAS factory",
    "Unable to register cuFFT factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
)


class _StartupNoiseFilter:
    """Routes this process's stderr (file descriptor 2, where C++ writes too) through a pipe
    that drops `_STARTUP_NOISE` lines; `--tf_logs` (or PIBCONV_TF_LOGS=1) keeps them."""

    def start(self):
        self.original = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.reader = threading.Thread(target=self._forward, args=(read,), daemon=True)
        self.reader.start()
        atexit.register(self.stop)

    def _forward(self, read):
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                text = line.decode(errors="replace")
                if not any(noise in text for noise in _STARTUP_NOISE):
                    os.write(self.original, line)

    def stop(self):
        sys.stderr.flush()
        os.dup2(self.original, 2)  # closes the pipe's last writer: the reader drains and ends
        self.reader.join(timeout=5)


if "--tf_logs" not in sys.argv and os.environ.get("PIBCONV_TF_LOGS", "") in ("", "0"):
    _StartupNoiseFilter().start()

BACKENDS = ("tensorflow", "jax")


def _backend_argument(argv):
    """The value of --backend on the command line, read before Keras is imported (Keras
    picks its backend at import; the flag is parsed only later)."""
    for index, argument in enumerate(argv):
        if argument.startswith("--backend="):
            return argument.split("=", 1)[1]
        if argument == "--backend" and index + 1 < len(argv):
            return argv[index + 1]
    return None


_BACKEND_ARGUMENT = _backend_argument(sys.argv[1:])
if _BACKEND_ARGUMENT in BACKENDS:
    os.environ["KERAS_BACKEND"] = _BACKEND_ARGUMENT
# JAX keeps its compiled steps on disk (read at its import): a resumed or repeated run with
# the same network and batch skips most of the first step's XLA compilation. Set
# JAX_COMPILATION_CACHE_DIR to move it, or to "" to turn it off.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pibconv_tf", "jax"
    ),
)

from absl import app, flags  # noqa: E402

from pibconv_tf.errors import RunError, UserInputError  # noqa: E402

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored")
# The flags of TensorFlow's runtime: apps that run TensorFlow define them with `RUNTIME`.
RUNTIME = ("graph_optimizer", "intra_op_threads", "inter_op_threads", "cpu_kernels")

_FACTORIES = {
    "dataset": lambda: flags.DEFINE_string(
        "dataset",
        "cifar10",
        "A TFDS image-classification dataset (cifar10, cifar100, svhn_cropped, ...), "
        "'digits' (embedded, no download) or 'folder:PATH' (one sub-folder per class).",
    ),
    "data_dir": lambda: flags.DEFINE_string(
        "data_dir", None, "TFDS data directory holding a downloaded or prepared copy."
    ),
    "image_size": lambda: flags.DEFINE_integer(
        "image_size", 32, "Height and width the images are resized to."
    ),
    "seed": lambda: flags.DEFINE_integer(
        "seed", 0, "Random seed (data split, initialisation, augmentation)."
    ),
    "strategy": lambda: flags.DEFINE_enum(
        "strategy",
        "auto",
        list(STRATEGIES),
        "tf.distribute strategy; auto = MirroredStrategy over all GPUs when there are several.",
    ),
    "sync_batch_norm": lambda: flags.DEFINE_bool(
        "sync_batch_norm",
        False,
        "BatchNorm normalises by the statistics of the whole global batch (all replicas) "
        "instead of each replica's own (the default, as DARTS on several GPUs).",
    ),
    "model_dir": lambda: flags.DEFINE_string(
        "model_dir", None, "Directory that receives the run's outputs."
    ),
    "resume": lambda: flags.DEFINE_bool(
        "resume", False, "Continue the run in --model_dir from its checkpoint."
    ),
    "overwrite": lambda: flags.DEFINE_bool(
        "overwrite", False, "Replace the contents of a non-empty output directory."
    ),
    "mixed_precision": lambda: flags.DEFINE_enum(
        "mixed_precision",
        None,
        ["mixed_float16", "mixed_bfloat16"],
        "Keras mixed-precision policy (float16 uses dynamic loss scaling).",
    ),
    "jit_compile": lambda: flags.DEFINE_bool("jit_compile", False, "Compile the step with XLA."),
    "graph_optimizer": lambda: flags.DEFINE_enum(
        "graph_optimizer",
        "auto",
        ["auto", "on", "off"],
        "TensorFlow's graph optimiser (Grappler); auto = on with a GPU, off on a CPU, where it "
        "adds minutes to the first step and nothing to the speed of the next ones.",
    ),
    "intra_op_threads": lambda: flags.DEFINE_integer(
        "intra_op_threads",
        -1,
        "Threads of one TensorFlow operation: -1 = auto (1 on a CPU-only machine with at most "
        "4 cores, else TensorFlow's choice), 0 = TensorFlow's choice.",
    ),
    "inter_op_threads": lambda: flags.DEFINE_integer(
        "inter_op_threads",
        -1,
        "TensorFlow operations run at once: -1 = auto (the core count on a CPU-only machine "
        "with at most 4 cores, else TensorFlow's choice), 0 = TensorFlow's choice.",
    ),
    "backend": lambda: flags.DEFINE_enum(
        "backend",
        os.environ.get("KERAS_BACKEND", "tensorflow")
        if os.environ.get("KERAS_BACKEND") in BACKENDS
        else "tensorflow",
        list(BACKENDS),
        "Keras backend: tensorflow (tf.distribute, the CPU kernels, export) or jax (the whole "
        "step jitted by XLA; data parallel over local devices). Default: KERAS_BACKEND.",
    ),
    "cpu_kernels": lambda: flags.DEFINE_enum(
        "cpu_kernels",
        None,
        ["auto", "on", "off"],
        "TensorFlow's faster CPU training kernels (pibconv_tf/kernels; same numbers, same "
        "saved files): auto = on with TensorFlow and no GPU. Default: the environment "
        "variable PIBCONV_CPU_KERNELS, else auto.",
    ),
}
_DEFINED = {}

TF_LOGS = flags.DEFINE_bool(
    "tf_logs",
    False,
    "Show TensorFlow's C++ start-up log lines (oneDNN, CUDA probing), hidden by default.",
)


def define(*names):
    """Defines the shared flags `names` (each once per process); returns their holders as
    attributes, e.g. `define("dataset", "seed").dataset.value`."""
    unknown = sorted(set(names) - set(_FACTORIES))
    if unknown:
        raise ValueError(f"No shared flags {unknown}; known are {sorted(_FACTORIES)}.")
    for name in names:
        if name not in _DEFINED:
            _DEFINED[name] = _FACTORIES[name]()
    return types.SimpleNamespace(**{name: _DEFINED[name] for name in names})


def _configure_runtime():
    """Applies the runtime flags this app defined (before anything runs)."""
    from pibconv_tf.model import acceleration  # noqa: PLC0415

    # An app that has not imported Keras (the benchmark's parent process, which stays light)
    # leaves the choice to KERAS_BACKEND, set from --backend before any import.
    if "backend" in _DEFINED and "keras" in sys.modules:
        wanted = _DEFINED["backend"].value
        keras = sys.modules["keras"]

        if keras.backend.backend() != wanted:
            raise UserInputError(
                f"--backend={wanted} was given, but Keras already runs on "
                f"{keras.backend.backend()} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')})."
            )
        if wanted == "jax" and "tensorflow" in sys.modules:
            # TensorFlow stays for the input pipelines only: keep it off the GPUs JAX uses.
            sys.modules["tensorflow"].config.set_visible_devices([], "GPU")
        print(f"Backend: {wanted} on {_devices(wanted)}.", flush=True)

    if "cpu_kernels" in _DEFINED:
        mode = _DEFINED["cpu_kernels"].value
        try:
            acceleration.set_mode(mode or acceleration.mode_from_environment())
        except ValueError as error:
            raise UserInputError(str(error)) from error
    if "tensorflow" in sys.modules and "graph_optimizer" in _DEFINED:
        from pibconv_tf import distribute  # noqa: PLC0415

        distribute.configure_threads(
            _DEFINED["intra_op_threads"].value, _DEFINED["inter_op_threads"].value
        )
        distribute.configure_graph_optimizer(_DEFINED["graph_optimizer"].value)
    if "strategy" in _DEFINED and os.environ.get("TF_CONFIG"):
        from pibconv_tf import distribute  # noqa: PLC0415

        # A multi-worker launch: its collectives must be set up before TensorFlow runs.
        distribute.start_multi_worker()


def _devices(backend):
    """The accelerators the backend sees, e.g. "2 gpu devices" or "the CPU"."""
    if backend == "jax":
        import jax  # noqa: PLC0415

        kinds = [d.platform for d in jax.local_devices()]
    else:
        import tensorflow as tf  # noqa: PLC0415

        kinds = ["gpu"] * len(tf.config.list_physical_devices("GPU")) or ["cpu"]
    if kinds == ["cpu"]:
        return "the CPU"
    return ", ".join(f"{kinds.count(k)} {k} device{'s' * (kinds.count(k) > 1)}" for k in set(kinds))


def interrupted(app, model_dir, error=None):
    """Ctrl-C: say what was kept and how to continue; exit status 130."""
    kept = getattr(error, "message", None) or "Interrupted; the last epoch's checkpoint stays."
    print(
        f"\n{kept} Continue with: python -m {app} --resume --model_dir={model_dir}",
        file=sys.stderr,
    )
    sys.exit(130)


def run(main):
    """`app.run(main)`, turning bad input into one sentence on stderr and exit status 1."""

    def guarded(argv):
        try:
            _configure_runtime()
            return main(argv)
        except (UserInputError, RunError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # JAX's probe of TPU and GPU plugins at start-up ("Unable to initialize backend 'tpu'").
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    app.run(guarded)
