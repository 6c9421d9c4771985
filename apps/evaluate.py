"""Evaluates a trained model: top-1, top-5, parameters, GMACs and images per second.

python -m apps.evaluate --model=runs/digits_l2/model.keras --dataset=digits \
    --output=runs/digits_l2/eval_test.json

Uses the normalisation in `dataset.json` and the seed in `config.json` next to the model
(written by apps.train) when they exist, so the split and the inputs match training.
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)

import json

from absl import flags, logging

from pibconv_tf import evaluation

_SHARED = common.define("dataset", "data_dir", "image_size", "seed", "jit_compile", *common.RUNTIME)

FLAGS = flags.FLAGS
_MODEL = flags.DEFINE_string("model", None, "Path of a .keras model (e.g. DIR/model.keras).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "train"], "The split to evaluate.")
_OUTPUT = flags.DEFINE_string("output", None, "Optional path of the results JSON.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = evaluation.EvaluateConfig(
        model=_MODEL.value,
        dataset=_SHARED.dataset.value,
        data_dir=_SHARED.data_dir.value,
        # The model's own input size unless --image_size is given (then it must match).
        image_size=_SHARED.image_size.value if FLAGS["image_size"].present else None,
        seed=_SHARED.seed.value if FLAGS["seed"].present else None,
        split=_SPLIT.value,
        batch_size=_BATCH_SIZE.value,
        output=_OUTPUT.value,
        jit_compile=_SHARED.jit_compile.value,
    )
    print(json.dumps(evaluation.evaluate_file(config), indent=2, sort_keys=True))


if __name__ == "__main__":
    common.run(main)
