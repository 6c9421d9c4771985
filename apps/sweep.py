"""Trains one genotype at several layer counts: the paper's Table 1.

python -m apps.sweep --genotype=PIBCONV --layers=2,3,4,5 --epochs=600 --model_dir=runs/sweep

On the embedded digits, end to end on a CPU:
python -m apps.sweep --genotype=PIBCONV --dataset=digits --layers=2,3 --init_channels=16 \
    --epochs=10 --batch_size=32 --model_dir=runs/digits_sweep

Every apps.train flag passes through. Rows train in `model_dir/layers_{n}`; `table.md` and
`table.csv` list the finished rows. `--resume` skips finished rows, resumes an interrupted
one and may add layer counts.
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)
from apps import train as train_app  # defines the training flags, shared with apps.train

from absl import flags, logging

from pibconv_tf.experiments import sweep
from pibconv_tf.train import config as train_config

FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    values, present = train_app.flag_values()
    layer_counts = train_app.parse_layers(FLAGS.layers)
    if values["resume"]:
        overrides = {name: values[name] for name in present}
        if FLAGS["layers"].present:
            overrides["layers"] = layer_counts
        config, layer_counts = sweep.resumed_sweep(values["model_dir"], overrides)
    else:
        config = train_config.TrainConfig(layers=layer_counts[0], **values)
    try:
        rows = sweep.run_sweep(config, layer_counts)
    except KeyboardInterrupt as error:
        common.interrupted("apps.sweep", config.model_dir, error)
    print(sweep.format_markdown(rows), end="")


if __name__ == "__main__":
    common.run(main)
