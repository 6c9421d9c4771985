"""Quantization-aware fine-tuning of a trained model.keras, exported as full-integer int8 TFLite.

python -m apps.qat --model=runs/digits_l2/model.keras --output_dir=runs/digits_l2/qat \
    --dataset=digits --epochs=3 --learning_rate=1e-3

Fine-tunes the model through a fake-quant graph of TFLite's int8 scheme (per-channel weights,
per-tensor activations, BatchNorm frozen; pibconv_tf/deploy/qat.py), then writes the post-training
int8 model of the original weights (ptq/), the fine-tuned model (model_qat.keras), its int8 model
(qat/) and parity.json with fp32, post-training int8 and QAT int8 top-1 on the same test images
(docs/export.md, "Quantization-aware fine-tuning"). Without --seed, the training run's seed
(config.json next to the model) splits the dataset, as in training.
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)

from absl import flags, logging

from pibconv_tf.deploy import qat
from pibconv_tf.errors import UserInputError

_SHARED = common.define("dataset", "data_dir", "seed", "overwrite", *common.RUNTIME)

FLAGS = flags.FLAGS
_MODEL = flags.DEFINE_string("model", None, "The logits-only model.keras written by training.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory receiving the QAT outputs.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Fine-tuning epochs (> 0).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Constant SGD learning rate (> 0).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Fine-tuning batch size.")
_CALIBRATION_IMAGES = flags.DEFINE_integer(
    "calibration_images", 300, "Train images calibrating both int8 models and the QAT ranges."
)
_TEST_IMAGES = flags.DEFINE_integer(
    "test_images", None, "Test images of the comparison (default: the whole test split)."
)

_TRAIN_IMAGES = flags.DEFINE_integer(
    "train_images", None, "Train images fine-tuning (default: the whole train split)."
)


def config_from_flags():
    if not _MODEL.value or not _OUTPUT_DIR.value:
        raise UserInputError("--model and --output_dir are required.")
    return qat.QATConfig(
        model=_MODEL.value,
        output_dir=_OUTPUT_DIR.value,
        dataset=_SHARED.dataset.value,
        data_dir=_SHARED.data_dir.value,
        seed=_SHARED.seed.value if FLAGS["seed"].present else None,
        epochs=_EPOCHS.value,
        learning_rate=_LEARNING_RATE.value,
        batch_size=_BATCH_SIZE.value,
        calibration_images=_CALIBRATION_IMAGES.value,
        test_images=_TEST_IMAGES.value,
        train_images=_TRAIN_IMAGES.value,
        overwrite=_SHARED.overwrite.value,
    )


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's SavedModel writer logs at INFO
    config = config_from_flags()
    config.validate()
    report = qat.run_qat(config)
    print(qat.format_report(report))
    print(f"Wrote {config.output_dir}/parity.json")


if __name__ == "__main__":
    common.run(main)
