"""Trains a derived network from scratch with the DARTS/PIBConv evaluation recipe.

python -m apps.train --genotype=PIBCONV --dataset=cifar10 --model_dir=runs/pibconv_l20

Offline, on the embedded digits (a few minutes on a CPU):
python -m apps.train --genotype=PIBCONV --dataset=digits --layers=2 --init_channels=16 \
    --epochs=30 --batch_size=32 --model_dir=runs/digits_l2

Defaults are the paper's recipe (600 epochs, batch 96, lr 0.025 cosine to 0, momentum 0.9,
weight decay 3e-4, clip 5, cutout 16, drop path 0.2, auxiliary weight 0.4). `--resume
--model_dir=DIR` continues a run with its stored configuration; outputs are listed in
`pibconv_tf/train/run.py` (`train`).
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)


from absl import flags, logging

from pibconv_tf.train import run as training

from pibconv_tf.train import config as train_config
from pibconv_tf.errors import UserInputError

_SHARED = common.define(
    "dataset",
    "data_dir",
    "image_size",
    "seed",
    "strategy",
    "sync_batch_norm",
    "model_dir",
    "resume",
    "overwrite",
    "mixed_precision",
    "jit_compile",
    "backend",
    *common.RUNTIME,
)

FLAGS = flags.FLAGS
_GENOTYPE = flags.DEFINE_string(
    "genotype", "PIBCONV", "A named genotype (PIBCONV, DARTS_V2) or a genotype.json path."
)
_LAYERS = flags.DEFINE_list(
    "layers", ["20"], "Number of cells (one value; apps.sweep takes a list, e.g. 2,3,4,5)."
)
_INIT_CHANNELS = flags.DEFINE_integer("init_channels", 36, "C of the first cells (even).")
_EPOCHS = flags.DEFINE_integer("epochs", 600, "Training epochs (the cosine's length).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 96, "Global batch size (over all replicas).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.025, "Initial learning rate.")
_MIN_LEARNING_RATE = flags.DEFINE_float("min_learning_rate", 0.0, "Final learning rate.")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 3e-4, "Coupled (L2) weight decay.")
_GRAD_CLIP = flags.DEFINE_float("grad_clip", 5.0, "Gradient global-norm clip (0: off).")
_CUTOUT_LENGTH = flags.DEFINE_integer("cutout_length", 16, "Cutout square side (0: off).")
_RANDAUGMENT = flags.DEFINE_float(
    "randaugment",
    0.0,
    "Magnitude (0..1] of keras-cv's RandAugment (2 ops per image) before crop, flip and "
    "cutout; 0 (default): DARTS' recipe without it.",
)
_DROP_PATH_PROB = flags.DEFINE_float(
    "drop_path_prob", 0.2, "Final drop path rate, ramped linearly from 0 over the epochs."
)
_AUXILIARY_WEIGHT = flags.DEFINE_float(
    "auxiliary_weight", 0.4, "Weight of the auxiliary tower's loss (0: no auxiliary head)."
)
_EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", 1, "Evaluate on the test split every N epochs (and after the last)."
)
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", 0, "At most this many steps per epoch (0: the whole train split)."
)
_VERBOSE = flags.DEFINE_integer(
    "verbose", 1, "0 silent, 1 progress bar and a line per epoch, 2 the line only."
)

# Flag name -> TrainConfig field, for every flag that feeds the config.
CONFIG_FLAGS = (
    "genotype",
    "dataset",
    "data_dir",
    "image_size",
    "seed",
    "init_channels",
    "epochs",
    "batch_size",
    "learning_rate",
    "min_learning_rate",
    "momentum",
    "weight_decay",
    "grad_clip",
    "cutout_length",
    "randaugment",
    "drop_path_prob",
    "auxiliary_weight",
    "eval_every",
    "steps_per_epoch",
    "strategy",
    "sync_batch_norm",
    "mixed_precision",
    "jit_compile",
    "model_dir",
    "resume",
    "overwrite",
    "verbose",
)


def parse_layers(values):
    """The --layers list as integers, each >= 1."""
    try:
        layers = [int(value) for value in values]
    except ValueError as error:
        raise UserInputError(f"--layers must be whole numbers, got {','.join(values)}.") from error
    if not layers or min(layers) < 1:
        raise UserInputError(f"--layers must list counts >= 1, got {','.join(values)}.")
    return layers


def flag_values():
    """{field: value} of all config flags, and the set of those given on the command line."""
    values = {name: FLAGS[name].value for name in CONFIG_FLAGS}
    present = {name for name in CONFIG_FLAGS if FLAGS[name].present}
    return values, present


def config_from_flags(layers):
    """The TrainConfig of the command line; with --resume, the run's own config updated
    with the flags given again."""
    values, present = flag_values()
    if values["resume"]:
        overrides = {name: values[name] for name in present}
        if FLAGS["layers"].present:
            overrides["layers"] = layers
        return train_config.resumed_config(values["model_dir"], overrides)
    return train_config.TrainConfig(layers=layers, **values)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TF's checkpointing logs at INFO per save
    layers = parse_layers(_LAYERS.value)
    if len(layers) != 1:
        raise UserInputError(
            f"--layers takes one count in apps.train, got {','.join(_LAYERS.value)}; "
            "use apps.sweep to train several."
        )
    config = config_from_flags(layers[0])
    try:
        result = training.train(config)
    except KeyboardInterrupt as error:
        common.interrupted("apps.train", config.model_dir, error)
    print(
        f"Trained {result['epochs']} epochs: test top-1 {100 * result['test_accuracy']:.2f}% "
        f"(best {100 * result['best_test_accuracy']:.2f}% at epoch {result['best_epoch']}); "
        f"model: {result['model']}"
    )


if __name__ == "__main__":
    common.run(main)
