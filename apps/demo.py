r"""The main job end to end on data that needs no download: `make demo` runs this.

python -m apps.demo --output_dir=runs/demo --overwrite

search (a few epochs) -> derived genotype -> train the derived network -> evaluate -> export
(SavedModel, TFLite float32, int8 and mixed int8) -> run the TFLite models with the
TensorFlow-free edge runner -> GradCAM picture and search plots -> a summary (genotype,
accuracy, params/GMACs, TFLite sizes and latency, every artifact's path). The same pipeline
on other data:

python -m apps.demo --dataset=cifar10 --data_dir=~/tensorflow_datasets \
    --output_dir=runs/demo_cifar10

--dataset defaults to the embedded `digits` here (the other apps default to cifar10). The
stages run in this process, through the library functions behind the apps.
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)

import dataclasses

from absl import flags

from pibconv_tf import demo

_SHARED = common.define("dataset", "data_dir", "seed", "overwrite", *common.RUNTIME)
flags.set_default(_SHARED.dataset, "digits")  # the other apps default to cifar10

_DEFAULTS = demo.PipelineConfig()
_OUTPUT_DIR = flags.DEFINE_string("output_dir", _DEFAULTS.output_dir, "Where every stage writes.")
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", _DEFAULTS.search_epochs, "Search epochs.")
_SEARCH_LAYERS = flags.DEFINE_integer("search_layers", _DEFAULTS.search_layers, "Search cells.")
_SEARCH_CHANNELS = flags.DEFINE_integer(
    "search_channels", _DEFAULTS.search_channels, "C of the search network."
)
_SEARCH_SPACE = flags.DEFINE_string(
    "search_space", _DEFAULTS.search_space, "darts, darts_gelu, darts_gelu_ln, convnext, pibconv."
)
_TRAIN_EPOCHS = flags.DEFINE_integer("train_epochs", _DEFAULTS.train_epochs, "Training epochs.")
_TRAIN_LAYERS = flags.DEFINE_integer("train_layers", _DEFAULTS.train_layers, "Trained cells.")
_TRAIN_CHANNELS = flags.DEFINE_integer(
    "train_channels", _DEFAULTS.train_channels, "C of the trained network."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULTS.train_batch_size, "Batch size.")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", 0, "At most this many steps per search/train epoch (0: all)."
)
_BENCHMARK_RUNS = flags.DEFINE_integer(
    "benchmark_runs", _DEFAULTS.benchmark_runs, "Timed TFLite runs per model."
)


def main(argv):
    del argv
    config = dataclasses.replace(
        _DEFAULTS,
        output_dir=_OUTPUT_DIR.value,
        dataset=_SHARED.dataset.value,
        data_dir=_SHARED.data_dir.value,
        seed=_SHARED.seed.value,
        search_space=_SEARCH_SPACE.value,
        search_epochs=_SEARCH_EPOCHS.value,
        search_layers=_SEARCH_LAYERS.value,
        search_channels=_SEARCH_CHANNELS.value,
        search_batch_size=_BATCH_SIZE.value,
        search_steps_per_epoch=_STEPS_PER_EPOCH.value,
        train_epochs=_TRAIN_EPOCHS.value,
        train_layers=_TRAIN_LAYERS.value,
        train_channels=_TRAIN_CHANNELS.value,
        train_batch_size=_BATCH_SIZE.value,
        train_steps_per_epoch=_STEPS_PER_EPOCH.value,
        benchmark_runs=_BENCHMARK_RUNS.value,
        overwrite=_SHARED.overwrite.value,
    )
    demo.run_pipeline(config)


if __name__ == "__main__":
    common.run(main)
