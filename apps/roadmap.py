r"""The paper's roadmap (Fig. 1): search, train and evaluate each stage of the search space.

Quick, on the embedded digits (no download; about 5 minutes on 2 CPU cores): 3-cell
search networks with C=8 and 2 nodes, 2 search epochs of 10 steps, then the derived
genotypes trained at 2 cells, C=8, 3 epochs of 20 steps, at 16x16:

    python -m apps.roadmap --dataset=digits --image_size=16 --model_dir=runs/roadmap \
        --search_layers=3 --search_channels=8 --search_nodes=2 --search_epochs=2 \
        --search_batch_size=32 --search_steps_per_epoch=10 --layers=2 --init_channels=8 \
        --epochs=3 --batch_size=32 --steps_per_epoch=20 --cutout_length=4

The paper's procedure (CIFAR-10 prepared for TFDS in --data_dir, on GPUs; the defaults are
its Sec. 3 settings: search C=16, 8 cells, 4 nodes, 50 epochs, batch 64; training 600 epochs,
batch 96, cutout, drop path 0.2, auxiliary 0.4), at 20 cells and three seeds:

    python -m apps.roadmap --dataset=cifar10 --data_dir=$TFDS --model_dir=runs/roadmap \
        --layers=20 --seeds=0,1,2 --strategy=mirrored

`--stages` picks the stages (search spaces, in order; `pibconv_f3` is PIBConv with the
bottleneck ratio F = 3, `pibconv_gelu` the paper's literal GELU reading). Interrupted?
`--resume --model_dir=DIR` continues at the stage and epoch where it stopped. Outputs in
--model_dir: roadmap.csv, roadmap.md, roadmap_runs.csv, roadmap.png, config.json, and one
search and one training run directory per stage and seed.
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)

import json
import os

from absl import flags, logging

from pibconv_tf.experiments import roadmap
from pibconv_tf.train import config as train_config
from pibconv_tf.errors import UserInputError
from pibconv_tf.runs import CONFIG
from pibconv_tf.search.config import SearchConfig

_SHARED = common.define(
    "dataset",
    "data_dir",
    "image_size",
    "strategy",
    "sync_batch_norm",
    "model_dir",
    "resume",
    "overwrite",
    "mixed_precision",
    "jit_compile",
    *common.RUNTIME,
)

FLAGS = flags.FLAGS
_STAGES = flags.DEFINE_list(
    "stages",
    list(roadmap.STAGES),
    "Roadmap stages in order: search spaces (darts, darts_gelu, darts_gelu_ln, convnext, "
    "pibconv, pibconv_gelu, pibconv_f<F>).",
)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds; each stage runs once per seed.")
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", 50, "Search epochs.")
_SEARCH_LAYERS = flags.DEFINE_integer("search_layers", 8, "Cells of the search network.")
_SEARCH_CHANNELS = flags.DEFINE_integer("search_channels", 16, "C of the search network.")
_SEARCH_NODES = flags.DEFINE_integer("search_nodes", 4, "Intermediate nodes per cell.")
_SEARCH_BATCH_SIZE = flags.DEFINE_integer("search_batch_size", 64, "Search batch size.")
_SEARCH_LEARNING_RATE = flags.DEFINE_float(
    "search_learning_rate", 0.0025, "Initial SGD learning rate of the search's weights."
)
_SEARCH_STEPS = flags.DEFINE_integer(
    "search_steps_per_epoch", 0, "At most this many steps per search epoch (0: all)."
)
_UNROLLED = flags.DEFINE_bool("unrolled", False, "Second-order DARTS in the searches.")
_LAYERS = flags.DEFINE_integer("layers", 20, "Cells of the trained networks.")
_INIT_CHANNELS = flags.DEFINE_integer("init_channels", 36, "C of the trained networks.")
_EPOCHS = flags.DEFINE_integer("epochs", 600, "Training epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 96, "Training batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.025, "Initial training learning rate.")
_STEPS = flags.DEFINE_integer(
    "steps_per_epoch", 0, "At most this many steps per training epoch (0: all)."
)
_CUTOUT_LENGTH = flags.DEFINE_integer("cutout_length", 16, "Cutout square side (0: off).")
_DROP_PATH_PROB = flags.DEFINE_float("drop_path_prob", 0.2, "Final drop path rate.")
_AUXILIARY_WEIGHT = flags.DEFINE_float(
    "auxiliary_weight", 0.4, "Weight of the auxiliary tower's loss (0: no auxiliary head)."
)
_VERBOSE = flags.DEFINE_integer("verbose", 2, "0 silent, 1 progress bars, 2 a line per epoch.")


def _seeds(values):
    try:
        return tuple(int(value) for value in values)
    except ValueError as error:
        raise UserInputError(f"--seeds must be whole numbers, got {','.join(values)}.") from error


def _templates():
    shared = dict(
        dataset=_SHARED.dataset.value,
        data_dir=_SHARED.data_dir.value,
        image_size=_SHARED.image_size.value,
        strategy=_SHARED.strategy.value,
        sync_batch_norm=_SHARED.sync_batch_norm.value,
        mixed_precision=_SHARED.mixed_precision.value,
        jit_compile=_SHARED.jit_compile.value,
    )
    search = SearchConfig(
        **shared,
        epochs=_SEARCH_EPOCHS.value,
        layers=_SEARCH_LAYERS.value,
        init_channels=_SEARCH_CHANNELS.value,
        nodes=_SEARCH_NODES.value,
        batch_size=_SEARCH_BATCH_SIZE.value,
        learning_rate=_SEARCH_LEARNING_RATE.value,
        steps_per_epoch=_SEARCH_STEPS.value,
        unrolled=_UNROLLED.value,
        verbose=min(_VERBOSE.value, 2),
    )
    train = train_config.TrainConfig(
        **shared,
        layers=_LAYERS.value,
        init_channels=_INIT_CHANNELS.value,
        epochs=_EPOCHS.value,
        batch_size=_BATCH_SIZE.value,
        learning_rate=_LEARNING_RATE.value,
        steps_per_epoch=_STEPS.value,
        cutout_length=_CUTOUT_LENGTH.value,
        drop_path_prob=_DROP_PATH_PROB.value,
        auxiliary_weight=_AUXILIARY_WEIGHT.value,
        verbose=_VERBOSE.value,
    )
    return search, train


def _resumed(model_dir, search, train):
    """The stored templates, with the flags given on this command line laid over them."""
    path = os.path.join(model_dir or "", CONFIG)
    if not model_dir or not os.path.isfile(path):
        raise UserInputError(f"--resume was given but {model_dir!r} holds no roadmap to resume.")
    with open(path) as stream:
        stored = json.load(stream)
    if not {"search", "train", "stages"} <= set(stored):
        raise UserInputError(f"{path!r} is not the config.json of a roadmap.")
    given = {name for name in FLAGS if FLAGS[name].present}
    fields = {
        "search": {
            f: getattr(search, f) for f in stored["search"] if _flag_of("search", f) in given
        },
        "train": {f: getattr(train, f) for f in stored["train"] if _flag_of("train", f) in given},
    }
    search = SearchConfig.from_dict({**stored["search"], **fields["search"]})
    train = train_config.TrainConfig.from_dict({**stored["train"], **fields["train"]})
    stages = tuple(_STAGES.value) if "stages" in given else tuple(stored["stages"])
    seeds = _seeds(_SEEDS.value) if "seeds" in given else tuple(stored["seeds"])
    return search, train, stages, seeds


# SearchConfig / TrainConfig field -> the flag that sets it, where the names differ.
_SEARCH_FLAGS = {
    "epochs": "search_epochs",
    "layers": "search_layers",
    "init_channels": "search_channels",
    "nodes": "search_nodes",
    "batch_size": "search_batch_size",
    "learning_rate": "search_learning_rate",
    "steps_per_epoch": "search_steps_per_epoch",
}


def _flag_of(part, field):
    return _SEARCH_FLAGS.get(field, field) if part == "search" else field


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    search, train = _templates()
    stages, seeds = tuple(_STAGES.value), _seeds(_SEEDS.value)
    model_dir = _SHARED.model_dir.value
    if _SHARED.resume.value:
        search, train, stages, seeds = _resumed(model_dir, search, train)
    config = roadmap.RoadmapConfig(
        output_dir=model_dir,
        stages=stages,
        seeds=seeds,
        search=search,
        train=train,
        resume=_SHARED.resume.value,
        overwrite=_SHARED.overwrite.value,
        verbose=_VERBOSE.value,
    )
    if not model_dir:
        raise UserInputError("--model_dir is required: where the roadmap writes its runs.")
    try:
        rows = roadmap.run_roadmap(config)
    except KeyboardInterrupt as error:
        common.interrupted("apps.roadmap", model_dir, error)
    print(roadmap.format_markdown(rows, []), end="")
    print(f"Tables and figure in {model_dir}: {roadmap.TABLE_MD}, {roadmap.FIGURE}.")


if __name__ == "__main__":
    common.run(main)
