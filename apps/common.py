"""Flags shared by several apps (defined once, here) and the apps' error handling.

Apps are thin absl binaries: flags -> a config dict -> one library call. Flags whose default
differs between apps (layers, epochs, batch size, ...) live in each app. Tests run apps in
subprocesses, never by importing two app modules into one process.
"""

import logging
import os
import sys

# Before TensorFlow is imported by anything: keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from pibconv_tf.errors import RunError, UserInputError  # noqa: E402

DATASET = flags.DEFINE_string(
    "dataset",
    "cifar10",
    "A TFDS image-classification dataset (cifar10, cifar100, svhn_cropped, ...), "
    "'digits' (embedded, no download) or 'folder:PATH' (one sub-folder per class).",
)
DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory holding a downloaded or prepared copy."
)
IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Height and width the images are resized to.")
SEED = flags.DEFINE_integer("seed", 0, "Random seed (data split, initialisation, augmentation).")
STRATEGY = flags.DEFINE_enum(
    "strategy",
    "auto",
    ["auto", "one_device", "mirrored", "multi_worker_mirrored"],
    "tf.distribute strategy; auto = MirroredStrategy over all GPUs when there are several.",
)
MODEL_DIR = flags.DEFINE_string("model_dir", None, "Directory that receives the run's outputs.")
RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --model_dir from its checkpoint.")
OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace the contents of a non-empty --model_dir."
)
MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision",
    None,
    ["mixed_float16", "mixed_bfloat16"],
    "Keras mixed-precision policy (float16 uses dynamic loss scaling).",
)
JIT_COMPILE = flags.DEFINE_bool("jit_compile", False, "Compile the step with XLA.")
GRAPH_OPTIMIZER = flags.DEFINE_enum(
    "graph_optimizer",
    "auto",
    ["auto", "on", "off"],
    "TensorFlow's graph optimiser (Grappler); auto = on with a GPU, off on a CPU, where it "
    "adds minutes to the first step and nothing to the speed of the next ones.",
)

INTRA_OP_THREADS = flags.DEFINE_integer(
    "intra_op_threads",
    -1,
    "Threads of one TensorFlow operation: -1 = auto (1 on a CPU-only machine with at most 4 "
    "cores, else TensorFlow's choice), 0 = TensorFlow's choice.",
)
INTER_OP_THREADS = flags.DEFINE_integer(
    "inter_op_threads",
    -1,
    "TensorFlow operations run at once: -1 = auto (the core count on a CPU-only machine with "
    "at most 4 cores, else TensorFlow's choice), 0 = TensorFlow's choice.",
)


def run(main):
    """`app.run(main)`, turning bad input into one sentence on stderr and exit status 1."""

    def guarded(argv):
        try:
            if "tensorflow" in sys.modules:  # apps.benchmark passes them to its workers
                from pibconv_tf import distribute  # noqa: PLC0415

                distribute.configure_threads(INTRA_OP_THREADS.value, INTER_OP_THREADS.value)
                distribute.configure_graph_optimizer(GRAPH_OPTIMIZER.value)
            return main(argv)
        except (UserInputError, RunError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    app.run(guarded)
