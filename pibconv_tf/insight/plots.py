"""The paper's figures from run outputs: alpha evolution, search curves, cells, sweeps.

- Fig. 3a: softmax(alpha) of chosen edges over the search epochs (`plot_alpha_evolution`),
  from a search directory's `alphas.npz` (arrays `normal` and `reduce`, epoch x edge x op,
  and `primitives`).
- Fig. 6: the search's top-1 error and loss per epoch (`plot_search_curves`), from its
  `metrics.jsonl` (every numeric key holding "acc" or "loss" is drawn).
- Fig. 4: the normal and reduction cells drawn as graphs (`plot_cells`), with matplotlib
  only (no Graphviz): inputs c_{k-2} and c_{k-1}, intermediate nodes 0..n-1, output c_{k}.
- Fig. 3b, 3c: test accuracy against parameters and against layers, one line per genotype
  (`plot_accuracy_vs`), from the sweep's `table.csv`.

`make_figures(PlotConfig(...))` reads everything first (so bad input leaves existing files
alone) and then writes the requested formats into the output directory.

Reference:
    Ahmadian et al., arXiv 2301.01286 (Figs. 3, 4, 6); Liu et al., DARTS, arXiv 1806.09055.
"""

import csv
import dataclasses
import json
import math
import os
import pathlib

import matplotlib
import numpy as np
from absl import logging

matplotlib.use("Agg")  # files only: never open a window
from matplotlib import patches, ticker  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from pibconv_tf import runs  # noqa: E402
from pibconv_tf.errors import UserInputError  # noqa: E402
from pibconv_tf.model import genotypes as genotypes_lib  # noqa: E402
from pibconv_tf.model import search_spaces  # noqa: E402
from pibconv_tf.runs import CONFIG, write_json_atomic  # noqa: E402

TABLE = "table.csv"
FORMATS = ("png", "svg", "pdf")
CELLS = ("normal", "reduce")
INPUT_NAMES = (r"$c_{k-2}$", r"$c_{k-1}$")
OUTPUT_NAME = r"$c_{k}$"
PANEL_SIZE = (3.4, 2.6)  # inches per alpha panel
LEGEND_HEIGHT = 0.6  # inches below the alpha panels


def save_figure(figure, path, dpi=100, close=True):
    """Writes `figure` to `path` (format from its suffix) atomically; closes it if `close`."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    figure.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".").lower())
    if close:
        plt.close(figure)
    os.replace(tmp, path)


def steps_of(num_edges):
    """Intermediate nodes of a cell with `num_edges` edges (node i has i + 2 inputs)."""
    steps, total = 0, 0
    while total < num_edges:
        total += steps + 2
        steps += 1
    if total != num_edges:
        raise UserInputError(f"{num_edges} edges do not make a DARTS cell (2, 5, 9, 14, ...).")
    return steps


def edge_endpoints(num_edges):
    """(node, input) of each edge, in the alphas' row order (node by node)."""
    return [(node, j) for node in range(steps_of(num_edges)) for j in range(node + 2)]


def state_name(index):
    """Cell state `index`: 0 and 1 are the cell's inputs, j >= 2 is node j - 2."""
    return INPUT_NAMES[index] if index < 2 else str(index - 2)


def read_alphas(search_dir):
    """{"normal", "reduce": float [epochs, edges, ops], "primitives": [names]}."""
    path = pathlib.Path(search_dir) / runs.ALPHAS
    if not pathlib.Path(search_dir).is_dir():
        raise UserInputError(f"--search_dir {str(search_dir)!r} is not a directory.")
    if not path.is_file():
        raise UserInputError(
            f"Search directory {str(search_dir)!r} has no {runs.ALPHAS}; the search has not "
            "finished an epoch yet, or this is not a search directory."
        )
    try:
        with np.load(path) as stored:
            alphas = {key: np.asarray(stored[key]) for key in (*CELLS, "primitives")}
    except (KeyError, ValueError, OSError) as error:
        raise UserInputError(
            f"{str(path)!r} is not a search's alphas file (arrays normal, reduce, primitives)."
        ) from error
    alphas["primitives"] = [str(name) for name in alphas["primitives"]]
    for cell in CELLS:
        weights = alphas[cell]
        if (
            weights.ndim != 3
            or weights.shape[0] < 1
            or weights.shape[2] != len(alphas["primitives"])
        ):
            raise UserInputError(
                f"{str(path)!r} array {cell!r} has shape {weights.shape}; expected epochs x "
                f"edges x {len(alphas['primitives'])} operations."
            )
        steps_of(weights.shape[1])
    return alphas


def read_jsonl(path):
    """The records of a JSON-lines file (a torn last line of a running job is skipped)."""
    records = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _flat_numbers(record, prefix=""):
    """Numeric leaves of a (possibly nested) record, keys joined with '/'."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def search_genotype(search_dir, alphas=None):
    """The search's genotype: genotype.json, else the last of genotypes.jsonl, else derived
    from the last epoch's alphas."""
    search_dir = pathlib.Path(search_dir)
    if (search_dir / runs.GENOTYPE).is_file():
        return genotypes_lib.Genotype.from_json((search_dir / runs.GENOTYPE).read_text())
    if (search_dir / runs.GENOTYPES).is_file():
        records = read_jsonl(search_dir / runs.GENOTYPES)
        if records:
            record = records[-1]
            return genotypes_lib.Genotype.from_dict(record.get("genotype", record))
    alphas = alphas or read_alphas(search_dir)
    primitives = alphas["primitives"]
    spaces = [
        name for name, s in search_spaces.SEARCH_SPACES.items() if list(s.primitives) == primitives
    ]
    if not spaces:
        raise UserInputError(f"Primitives {primitives} match no search space.")
    steps = steps_of(alphas["normal"].shape[1])
    return genotypes_lib.Genotype(
        normal=genotypes_lib.derive_cell(alphas["normal"][-1], primitives, steps),
        normal_concat=tuple(range(2, steps + 2)),
        reduce=genotypes_lib.derive_cell(alphas["reduce"][-1], primitives, steps),
        reduce_concat=tuple(range(2, steps + 2)),
        search_space=spaces[0],
    )


def plot_alpha_evolution(weights, primitives, edges=None, title="normal cell"):
    """One panel per edge: each operation's softmax(alpha) against the search epoch.

    Args:
        weights: float [epochs, edges, ops].
        primitives: the operations' names.
        edges: edge indices to draw (default all), in the alphas' row order.
        title: figure title.

    Returns:
        The `Figure`.
    """
    weights = np.asarray(weights)
    endpoints = edge_endpoints(weights.shape[1])
    edges = list(range(len(endpoints))) if edges is None else list(edges)
    bad = [e for e in edges if not 0 <= e < len(endpoints)]
    if bad or not edges:
        raise UserInputError(f"--edges {edges} must list edge indices in 0..{len(endpoints) - 1}.")
    cols = min(4, len(edges))
    rows = math.ceil(len(edges) / cols)
    figure, axes = plt.subplots(
        rows,
        cols,
        figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + LEGEND_HEIGHT),
        squeeze=False,
        sharex=True,
    )
    epochs = np.arange(1, weights.shape[0] + 1)
    colours = plt.get_cmap("tab10")
    for axis, edge in zip(axes.flat, edges, strict=False):
        node, source = endpoints[edge]
        for k, name in enumerate(primitives):
            axis.plot(epochs, weights[:, edge, k], color=colours(k % 10), label=name, lw=1.6)
        origin = state_name(source) if source < 2 else f"node {source - 2}"
        axis.set_title(f"edge {edge}: {origin} → node {node}", fontsize=10)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(edges) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    for axis in axes[:, 0]:
        axis.set_ylabel("softmax(α)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9)
    figure.suptitle(f"Architecture weights over the search: {title}")
    figure.tight_layout(rect=(0, LEGEND_HEIGHT / figure.get_size_inches()[1], 1, 1))
    return figure


def _split(key):
    """Legend name of a metric: `val_accuracy` -> "val", `accuracy` -> "train"."""
    words = [w for w in key.replace("/", "_").split("_") if "acc" not in w and "loss" not in w]
    return "_".join(words) or "train"


def plot_search_curves(records):
    """Top-1 error (%) and loss per epoch of every metric holding "acc" or "loss" (Fig. 6)."""
    flat = [_flat_numbers(record) for record in records]
    keys = sorted({key for record in flat for key in record})
    accuracy = [k for k in keys if "acc" in k.lower()]
    loss = [k for k in keys if "loss" in k.lower()]
    if not flat or not (accuracy or loss):
        raise UserInputError("The search's metrics.jsonl holds no accuracy or loss values.")
    epochs = [record.get("epoch", i + 1) for i, record in enumerate(flat)]
    figure, (error_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in accuracy:
        values = np.array([record.get(key, np.nan) for record in flat])
        scale = 100.0 if np.nanmax(values) <= 1.0 else 1.0
        error_axis.plot(epochs, 100.0 - scale * values, marker="o", ms=3, label=_split(key))
    for key in loss:
        values = [record.get(key, np.nan) for record in flat]
        loss_axis.plot(epochs, values, marker="o", ms=3, label=_split(key))
    error_axis.set(xlabel="epoch", ylabel="top-1 error (%)", title="Search: top-1 error")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="Search: loss")
    for axis in (error_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if axis.lines:
            axis.legend(fontsize=9)
    figure.tight_layout()
    return figure


SPACING = 1.5  # inches between neighbouring states of a drawn cell
NODE_RADIUS = 0.3


def _arc_height(span):
    """How far an edge over `span` states bends away from the line (inches)."""
    return 0.5 + 0.32 * (span - 1)


def _node(axis, x, text, colour):
    circle = patches.Circle((x, 0.0), NODE_RADIUS, facecolor=colour, edgecolor="black", zorder=3)
    axis.add_patch(circle)
    axis.text(x, 0.0, text, ha="center", va="center", fontsize=12, zorder=4)
    return circle


def _arc(axis, start, end, height, colour, width, style="-"):
    """An arrow between two state circles bending `height` above (> 0) or below (< 0)."""
    (x1, _), (x2, _) = start.center, end.center
    # arc3's control point is the chord midpoint + rad * (dy, -dx): apex offset rad*dx/2.
    axis.add_patch(
        patches.FancyArrowPatch(
            start.center,
            end.center,
            patchA=start,
            patchB=end,
            connectionstyle=f"arc3,rad={-2.0 * height / (x2 - x1)}",
            arrowstyle="-|>",
            mutation_scale=13,
            shrinkA=1,
            shrinkB=1,
            color=colour,
            lw=width,
            linestyle=style,
            zorder=2,
        )
    )
    return (x1 + x2) / 2, height


def draw_cell(axis, edges, concat, title):
    """Draws one cell as an arc diagram on `axis`; returns (op, input state, node) per edge,
    read back from the drawn labels.

    The states sit on a line in computation order (c_{k-2}, c_{k-1}, 0, 1, ..., c_{k}); a
    node's first edge arcs above the line, its second below, so no edge crosses a state
    and labels of different spans sit at different heights. The grey dashed arcs feed the
    concatenated output.

    Args:
        axis: a matplotlib `Axes`.
        edges: ((op, input), ...), two per node, as in a `Genotype`.
        concat: the states concatenated into the output.
        title: the panel title.
    """
    steps = len(edges) // genotypes_lib.EDGES_PER_NODE
    colours = ["#b7e4c7"] * 2 + ["#a9cce3"] * steps
    circles = [_node(axis, SPACING * i, state_name(i), colour) for i, colour in enumerate(colours)]
    output = _node(axis, SPACING * (steps + 2), OUTPUT_NAME, "#f9e79f")
    drawn, extent = [], 1.0
    for position, (op, source) in enumerate(edges):
        node = position // genotypes_lib.EDGES_PER_NODE
        side = 1.0 if position % genotypes_lib.EDGES_PER_NODE == 0 else -1.0
        height = side * _arc_height(node + 2 - source)
        label_xy = _arc(axis, circles[source], circles[node + 2], height, "0.2", 1.4)
        text = axis.text(
            *label_xy,
            op,
            ha="center",
            va="center",
            fontsize=9,
            zorder=5,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.6"},
        )
        drawn.append((text.get_text(), source, node))
        extent = max(extent, abs(height))
    for state in concat:
        _arc(axis, circles[state], output, -0.5 * _arc_height(steps + 2 - state), "0.6", 1.0, "--")
    axis.set_xlim(-0.5, SPACING * (steps + 2) + 0.5)
    axis.set_ylim(-extent - 0.35, extent + 0.35)
    axis.set_aspect("equal")
    axis.axis("off")
    axis.set_title(title, fontsize=12)
    return drawn


def plot_cells(genotype, name=""):
    """Fig. 4: (a) the normal and (b) the reduction cell of `genotype`, one above the other.

    Returns:
        (Figure, {"normal": drawn edges, "reduce": drawn edges}), see `draw_cell`.
    """
    width = SPACING * (genotype.steps + 2) + 1.0
    height = 2 * (_arc_height(genotype.steps + 1) + 0.35) + 0.5
    figure, axes = plt.subplots(2, 1, figsize=(width, 2 * height + 0.4))
    drawn = {
        "normal": draw_cell(axes[0], genotype.normal, genotype.normal_concat, "(a) normal cell"),
        "reduce": draw_cell(axes[1], genotype.reduce, genotype.reduce_concat, "(b) reduction cell"),
    }
    figure.suptitle(f"{name} ({genotype.search_space} search space)".strip(), fontsize=13)
    figure.tight_layout()
    return figure, drawn


def _column(fields, path, *candidates, contains=None, exclude=()):
    """The first of `candidates` in `fields`, else the first field holding `contains`."""
    for name in candidates:
        if name in fields:
            return name
    if contains is not None:
        for name in fields:
            low = name.lower()
            if contains in low and not any(word in low for word in exclude):
                return name
    wanted = " or ".join(candidates) or f"a column holding {contains!r}"
    raise UserInputError(f"Sweep table {str(path)!r} has no {wanted} column (it has {fields}).")


def read_sweep_rows(specs):
    """Rows {genotype, layers, accuracy (%), params_m} from sweep `table.csv` files or dirs.

    Columns are found by name: `genotype`; `layers`; `test_accuracy`, else the first column
    holding "acc" that is not a "best" one; `params_m` (millions), else `params` (a count).
    Accuracies at most 1 are taken as fractions and shown in percent.
    """
    rows = []
    for spec in specs:
        path = pathlib.Path(spec)
        path = path / TABLE if path.is_dir() else path
        if not path.is_file():
            raise UserInputError(f"Sweep table {spec!r} is neither a CSV file nor a sweep dir.")
        with open(path, newline="") as stream:
            table = list(csv.DictReader(stream))
        fields = list(table[0]) if table else []
        if not table:
            raise UserInputError(f"Sweep table {str(path)!r} has no rows yet.")
        genotype = _column(fields, path, "genotype")
        layers = _column(fields, path, "layers")
        accuracy = _column(fields, path, "test_accuracy", contains="acc", exclude=("best",))
        params = _column(fields, path, "params_m", "params", contains="param")
        try:
            parsed = [
                {
                    "genotype": row[genotype],
                    "layers": int(float(row[layers])),
                    "accuracy": float(row[accuracy]),
                    "params_m": float(row[params]),
                }
                for row in table
            ]
        except ValueError as error:
            raise UserInputError(f"Sweep table {str(path)!r} has a bad value: {error}.") from error
        if max(row["accuracy"] for row in parsed) <= 1.0:
            for row in parsed:
                row["accuracy"] *= 100.0
        if params != "params_m" and max(row["params_m"] for row in parsed) > 1000:
            for row in parsed:
                row["params_m"] /= 1e6
        rows += parsed
    return rows


def plot_accuracy_vs(rows, x="layers"):
    """Test accuracy against `x` ("layers" or "params_m"), one line per genotype (Fig. 3).

    Repeated (genotype, layers) rows (e.g. seeds) are averaged, with their spread as error
    bars; against parameters, each point is labelled with its layer count.
    """
    if x not in ("layers", "params_m"):
        raise ValueError(f"x must be 'layers' or 'params_m', got {x!r}.")
    figure, axis = plt.subplots(figsize=(6.4, 4.6))
    for genotype in dict.fromkeys(row["genotype"] for row in rows):
        mine = [row for row in rows if row["genotype"] == genotype]
        layers = sorted({row["layers"] for row in mine})
        groups = [[row for row in mine if row["layers"] == n] for n in layers]
        xs = [np.mean([row[x] for row in group]) for group in groups]
        accuracy = [np.mean([row["accuracy"] for row in group]) for group in groups]
        spread = [np.std([row["accuracy"] for row in group]) for group in groups]
        axis.errorbar(xs, accuracy, yerr=spread, marker="o", capsize=3, label=genotype)
        if x == "params_m":
            for n, px, py in zip(layers, xs, accuracy, strict=True):
                axis.annotate(f"{n}", (px, py), textcoords="offset points", xytext=(4, 4))
    label = "evaluation layers" if x == "layers" else "learnable parameters (M)"
    axis.set(xlabel=label, ylabel="test accuracy (%)", title=f"Test accuracy vs {label}")
    if x == "layers":
        axis.xaxis.get_major_locator().set_params(integer=True)
    axis.grid(alpha=0.3)
    axis.legend(title="genotype (points: layers)" if x == "params_m" else "genotype")
    figure.tight_layout()
    return figure


def plot_roadmap(rows):
    """The roadmap (Fig. 1): test top-1 per stage, with parameters and GMACs.

    Args:
        rows: `roadmap.stage_rows` dicts, in roadmap order (test_accuracy in %, its
            spread over seeds, params_m, gmacs).
    """
    stages = [row["stage"] for row in rows]
    positions = np.arange(len(rows))
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6.4, 1.4 * len(rows)), 6.0), sharex=True, height_ratios=(3, 2)
    )
    accuracy = [row["test_accuracy"] for row in rows]
    spread = [row.get("test_accuracy_std", 0.0) for row in rows]
    top.errorbar(positions, accuracy, yerr=spread, marker="o", capsize=4, color="tab:blue")
    for x, row in zip(positions, rows, strict=True):
        top.annotate(
            f"{row['test_accuracy']:.2f}%",
            (x, row["test_accuracy"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
        )
    top.margins(x=0.08, y=0.25)  # room for the labels above the points
    top.set(ylabel="test top-1 (%)", title="Roadmap of the search space (the paper's Fig. 1)")
    top.grid(alpha=0.3)
    width = 0.38
    bottom.bar(positions - width / 2, [r["params_m"] for r in rows], width, label="params (M)")
    twin = bottom.twinx()
    twin.bar(
        positions + width / 2, [r["gmacs"] for r in rows], width, color="tab:orange", label="GMACs"
    )
    bottom.set(ylabel="params (M)")
    twin.set(ylabel="GMACs")
    handles = bottom.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    bottom.legend(handles, ["params (M)", "GMACs"], loc="upper left")
    bottom.set_xticks(positions, stages, rotation=20)
    figure.tight_layout()
    return figure


@dataclasses.dataclass
class PlotConfig:
    """What `make_figures` draws; written as `config.json` into `output_dir`.

    Args:
        output_dir: where the figures go (must not be the search or a sweep directory).
        search_dir: a search's `--model_dir`: alphas, metrics and genotype.
        sweeps: sweep `table.csv` files or sweep directories.
        genotypes: named genotypes or genotype.json paths whose cells to draw.
        edges: edge indices of the alpha panels (default all).
        formats: any of "png", "svg", "pdf".
        dpi: resolution of the PNGs.
    """

    output_dir: str
    search_dir: str | None = None
    sweeps: list[str] = dataclasses.field(default_factory=list)
    genotypes: list[str] = dataclasses.field(default_factory=list)
    edges: list[int] | None = None
    formats: list[str] = dataclasses.field(default_factory=lambda: ["png"])
    dpi: int = 100

    def validate(self):
        if not (self.search_dir or self.sweeps or self.genotypes):
            raise UserInputError(
                "Nothing to plot: pass --search_dir, --sweep_csv and/or --genotype."
            )
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise UserInputError(f"--formats {self.formats} must be drawn from {FORMATS}.")
        if not 30 <= self.dpi <= 600:
            raise UserInputError(f"--dpi must be in 30..600, got {self.dpi}.")
        output = pathlib.Path(self.output_dir).resolve()
        inputs = [self.search_dir] if self.search_dir else []
        inputs += [s for s in self.sweeps if pathlib.Path(s).is_dir()]
        if any(output == pathlib.Path(d).resolve() for d in inputs):
            raise UserInputError(
                f"--output_dir {self.output_dir!r} is an input directory; its config.json "
                "would be overwritten. Pick another directory (default: SEARCH_DIR/figures)."
            )


def genotype_label(spec):
    """`PIBCONV` for a named genotype, the run directory for `.../genotype.json`."""
    if spec in genotypes_lib.NAMED_GENOTYPES:
        return spec
    path = pathlib.Path(spec)
    return path.parent.name if path.name == runs.GENOTYPE and path.parent.name else path.stem


def search_figures(search_dir, edges=None):
    """{name: Figure} of a search directory: alphas (per cell), curves and cells."""
    alphas = read_alphas(search_dir)
    figures = {
        f"alphas_{cell}": plot_alpha_evolution(
            alphas[cell], alphas["primitives"], edges, f"{cell} cell"
        )
        for cell in CELLS
    }
    metrics = pathlib.Path(search_dir) / runs.METRICS
    if metrics.is_file() and read_jsonl(metrics):
        figures["search_curves"] = plot_search_curves(read_jsonl(metrics))
    else:
        logging.warning("%s has no %s: no search curves.", search_dir, runs.METRICS)
    genotype = search_genotype(search_dir, alphas)
    name = pathlib.Path(search_dir).resolve().name
    figures["cells_search"] = plot_cells(genotype, f"Searched genotype ({name})")[0]
    return figures


def make_figures(config):
    """Draws every figure the config asks for, then writes them all; returns the paths."""
    config.validate()
    figures = {}
    try:
        if config.search_dir:
            figures.update(search_figures(config.search_dir, config.edges))
        for spec in config.genotypes:
            label = genotype_label(spec)
            genotype = genotypes_lib.load_genotype(spec)
            figures[f"cells_{label}"] = plot_cells(genotype, label)[0]
        if config.sweeps:
            rows = read_sweep_rows(config.sweeps)
            figures["accuracy_vs_layers"] = plot_accuracy_vs(rows, "layers")
            figures["accuracy_vs_params"] = plot_accuracy_vs(rows, "params_m")
    except UserInputError:
        plt.close("all")
        raise
    output_dir = pathlib.Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures.items():
        for fmt in config.formats:
            written.append(str(output_dir / f"{name}.{fmt}"))
            save_figure(figure, written[-1], config.dpi, close=False)
        plt.close(figure)
    write_json_atomic(output_dir / CONFIG, {**dataclasses.asdict(config), "written": written})
    return written
