"""Parameter and GMAC counts of derived networks: the paper's Table 1 columns.

python -m apps.complexity --genotype=DARTS_V2,PIBCONV --layers=20,15,10,8,7,6,5,4,3,2 \
    --init_channels=36 --format=table

GMACs follow ptflops' convention (see pibconv_tf/model/complexity.py); parameters leave out the
auxiliary head, as the paper does.
"""

from apps import common  # noqa: I001 (first: quiets TensorFlow before it loads)

import csv
import io
import json

from absl import flags

from pibconv_tf.model import complexity
from pibconv_tf.model import genotypes
from pibconv_tf.model import networks
from pibconv_tf.errors import UserInputError

_SHARED = common.define("image_size")

_GENOTYPE = flags.DEFINE_list(
    "genotype", ["DARTS_V2", "PIBCONV"], "Named genotypes or genotype.json paths."
)
_LAYERS = flags.DEFINE_list(
    "layers", ["20", "15", "10", "8", "7", "6", "5", "4", "3", "2"], "Layer counts."
)
_INIT_CHANNELS = flags.DEFINE_integer("init_channels", 36, "C of the first cells (36 in DARTS).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json", "csv"], "Output format.")


def parse_layers(values):
    try:
        layers = [int(value) for value in values]
    except ValueError as error:
        raise UserInputError(f"--layers must be whole numbers, got {','.join(values)}.") from error
    if not layers or min(layers) < 1:
        raise UserInputError(f"--layers must list counts >= 1, got {','.join(values)}.")
    return layers


def complexity_rows(genotype_specs, layer_counts, init_channels, num_classes, image_size):
    """One row per (genotype, layers): {genotype, layers, params, gmacs, conv_dense_gmacs}."""
    rows = []
    for spec in genotype_specs:
        genotype = genotypes.load_genotype(spec)
        for layers in layer_counts:
            model = networks.network_cifar(
                genotype, num_classes, init_channels, layers, image_size=image_size
            )
            rows.append({"genotype": spec, "layers": layers, **complexity.model_complexity(model)})
    return rows


def format_rows(rows, fmt):
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        stream = io.StringIO()
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return stream.getvalue().rstrip("\n")
    lines = [
        "| Genotype | Layers | Params (M) | GMAC | GMAC (conv+dense) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['genotype']} | {row['layers']} | {row['params'] / 1e6:.3f} | "
            f"{row['gmacs']:.3f} | {row['conv_dense_gmacs']:.3f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    if _INIT_CHANNELS.value < 2 or _INIT_CHANNELS.value % 2:
        raise UserInputError(
            f"--init_channels must be an even number >= 2, got {_INIT_CHANNELS.value}."
        )
    rows = complexity_rows(
        _GENOTYPE.value,
        parse_layers(_LAYERS.value),
        _INIT_CHANNELS.value,
        _NUM_CLASSES.value,
        _SHARED.image_size.value,
    )
    print(format_rows(rows, _FORMAT.value))


if __name__ == "__main__":
    common.run(main)
