"""The flags several apps share (each defined once, here) and the apps' error handling.

Apps are thin absl binaries: flags -> a config -> one library call. An app defines the
shared flags it uses with `define(...)` at import, next to its own, so that its `--help`
lists only flags it reads; `define` makes each flag once per process. Tests run apps in
subprocesses, never by importing two app modules into one process.
"""

import logging
import os
import sys
import types

# Before TensorFlow is imported by anything: keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
    app.run(guarded)
