"""GradCAM heat maps of one or more trained networks on the same images (the paper's Fig. 5).

python -m apps.gradcam --model=runs/darts_l20,runs/pibconv_l10,runs/pibconv_l20 \
    --model_labels="DARTSV2 (20),PIBConv (10),PIBConv (20)" --dataset=cifar10 \
    --indices=12,6,3,18 --output=figures/gradcam.png

Offline, on a model trained with `apps.train --dataset=digits`:
python -m apps.gradcam --model=runs/digits_l2 --dataset=digits --indices=0,1,2,3 \
    --output=figures/gradcam_digits.png

Writes the PNG grid (inputs with labels on top, one row of heat maps per model with the
predicted class and its probability), the raw maps as `<output>.npz` and the resolved
configuration as `<output>.config.json`. Models expect normalised images: mean, std and
class names come from the `dataset.json` saved beside each model, else from `--dataset`.
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)

from absl import flags

from pibconv_tf.insight import gradcam
from pibconv_tf.errors import UserInputError

_SHARED = common.define("dataset", "data_dir", "image_size", "seed", *common.RUNTIME)

_MODEL = flags.DEFINE_list("model", None, "Trained .keras files or run dirs with model.keras.")
_MODEL_LABELS = flags.DEFINE_list(
    "model_labels", None, "Row labels, one per model (default: the run dir or file names)."
)
_IMAGES = flags.DEFINE_list(
    "images", None, "Image files to explain (resized to the model input) instead of a dataset."
)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "test"], "Dataset split of --indices.")
_INDICES = flags.DEFINE_list("indices", ["0", "1", "2", "3"], "Positions in --split to explain.")
_METHOD = flags.DEFINE_enum("method", "gradcam", list(gradcam.METHODS), "CAM method.")
_LAYER = flags.DEFINE_string("layer", None, "Target layer name (default: the last cell).")
_TARGET = flags.DEFINE_enum(
    "target", "predicted", list(gradcam.TARGETS), "Class each map explains."
)
_UPSAMPLE = flags.DEFINE_integer("upsample", 224, "Side in pixels of each drawn picture.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Opacity of the heat map over the image.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per GradCAM call.")
_OUTPUT = flags.DEFINE_string("output", "gradcam.png", "The PNG to write (maps: same .npz).")


def parse_indices(values):
    try:
        return [int(value) for value in values]
    except ValueError as error:
        raise UserInputError(f"--indices must be whole numbers, got {','.join(values)}.") from error


def main(argv):
    del argv
    config = gradcam.GradcamConfig(
        models=_MODEL.value or [],
        output=_OUTPUT.value,
        model_labels=_MODEL_LABELS.value,
        images=_IMAGES.value,
        dataset=_SHARED.dataset.value,
        data_dir=_SHARED.data_dir.value,
        image_size=_SHARED.image_size.value,
        seed=_SHARED.seed.value,
        split=_SPLIT.value,
        indices=parse_indices(_INDICES.value),
        method=_METHOD.value,
        layer=_LAYER.value,
        target=_TARGET.value,
        upsample=_UPSAMPLE.value,
        alpha=_ALPHA.value,
        batch_size=_BATCH_SIZE.value,
    )
    summary = gradcam.run_gradcam(config)
    print(f"Wrote {summary['figure']}, {summary['maps']} and {summary['config']}.")


if __name__ == "__main__":
    common.run(main)
