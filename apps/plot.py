"""The paper's figures from run outputs: Fig. 3 (alphas; accuracy vs layers and params),
Fig. 4 (cells) and Fig. 6 (search curves).

python -m apps.plot --search_dir=runs/search --sweep_csv=runs/sweep_pibconv,runs/sweep_darts \
    --genotype=PIBCONV,DARTS_V2 --output_dir=figures --formats=png,pdf

Just the cells of named genotypes, no run needed:
python -m apps.plot --genotype=PIBCONV,DARTS_V2 --output_dir=figures

Writes into --output_dir (default SEARCH_DIR/figures, else ./figures): alphas_normal,
alphas_reduce (softmax(alpha) per edge over the epochs; --edges picks the panels),
search_curves, cells_search (the searched genotype), cells_NAME per --genotype,
accuracy_vs_layers and accuracy_vs_params (one line per genotype of the sweep tables), each
in every --formats, and config.json.
"""

from apps import common  # noqa: F401, I001 (first: quiets TensorFlow before it loads)

import os

from absl import flags

from pibconv_tf.insight import plots
from pibconv_tf.errors import UserInputError

_SEARCH_DIR = flags.DEFINE_string(
    "search_dir", None, "A search run's directory (alphas.npz, metrics.jsonl, genotype.json)."
)
_SWEEP_CSV = flags.DEFINE_list(
    "sweep_csv", [], "Sweep table.csv files or sweep directories (one genotype each, or more)."
)
_GENOTYPE = flags.DEFINE_list(
    "genotype", [], "Named genotypes (PIBCONV, DARTS_V2) or genotype.json paths to draw."
)
_EDGES = flags.DEFINE_list("edges", None, "Edge indices of the alpha panels (default all).")
_FORMATS = flags.DEFINE_list("formats", ["png"], "Any of png, svg, pdf.")
_DPI = flags.DEFINE_integer("dpi", 100, "Resolution of the PNG files.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the figures go (default SEARCH_DIR/figures, else ./figures)."
)


def parse_edges(values):
    if values is None:
        return None
    try:
        return [int(value) for value in values]
    except ValueError as error:
        raise UserInputError(f"--edges must be whole numbers, got {','.join(values)}.") from error


def main(argv):
    del argv
    output_dir = _OUTPUT_DIR.value
    if output_dir is None:
        output_dir = os.path.join(_SEARCH_DIR.value, "figures") if _SEARCH_DIR.value else "figures"
    config = plots.PlotConfig(
        output_dir=output_dir,
        search_dir=_SEARCH_DIR.value,
        sweeps=_SWEEP_CSV.value,
        genotypes=_GENOTYPE.value,
        edges=parse_edges(_EDGES.value),
        formats=[fmt.lower() for fmt in _FORMATS.value],
        dpi=_DPI.value,
    )
    written = plots.make_figures(config)
    print("\n".join(["Wrote:", *written]))


if __name__ == "__main__":
    common.run(main)
