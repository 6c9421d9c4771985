"""Tests for pibconv_tf.plots and apps.plot: figures that show the data they were given."""

import collections
import csv
import json
import os

import numpy as np
import pytest
from matplotlib import patches
from matplotlib import pyplot as plt
from PIL import Image

from pibconv_tf import runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.insight import plots
from pibconv_tf.model import genotypes as G
from pibconv_tf.model import search_spaces
from tests import app_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMITIVES = list(search_spaces.get_search_space("pibconv").primitives)
STEPS, EPOCHS = 3, 4  # a small search: 3 nodes (9 edges), 4 epochs

TWO_NODES = G.Genotype(  # a pair drawn twice (skip and pool from input 1 into node 1)
    normal=(("skip_connect", 0), ("pib_conv_3x3", 1), ("skip_connect", 1), ("avg_pool_3x3", 1)),
    normal_concat=(2, 3),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("dil_conv_5x5", 2), ("skip_connect", 0)),
    reduce_concat=(3,),
)


def _softmax_history(rng, edges):
    logits = np.cumsum(rng.normal(0, 0.3, (EPOCHS, edges, len(PRIMITIVES))), axis=0)
    weights = np.exp(logits)
    return weights / weights.sum(-1, keepdims=True)


def _write_search_dir(path, with_genotype=True):
    """The files the search app documents, for a 3-node, 4-epoch search."""
    rng = np.random.default_rng(0)
    edges = sum(2 + node for node in range(STEPS))
    alphas = {cell: _softmax_history(rng, edges) for cell in plots.CELLS}
    np.savez(path / runs.ALPHAS, primitives=np.array(PRIMITIVES), **alphas)
    history = []
    for epoch in range(EPOCHS):
        cells = {c: G.derive_cell(alphas[c][epoch], PRIMITIVES, STEPS) for c in plots.CELLS}
        concat = tuple(range(2, STEPS + 2))
        genotype = G.Genotype(cells["normal"], concat, cells["reduce"], concat)
        history.append(genotype)
        metrics = {
            "epoch": epoch + 1,
            "seconds": 1.5,
            "accuracy": 0.2 + 0.1 * epoch,
            "loss": 2.0 - 0.2 * epoch,
            "val_accuracy": 0.15 + 0.1 * epoch,
            "val_loss": 2.1 - 0.2 * epoch,
            "lr": 0.025,
        }
        with open(path / runs.METRICS, "a") as stream:
            stream.write(json.dumps(metrics) + "\n")
        with open(path / runs.GENOTYPES, "a") as stream:
            stream.write(json.dumps({"epoch": epoch + 1, "genotype": genotype.to_dict()}) + "\n")
    if with_genotype:
        (path / runs.GENOTYPE).write_text(history[-1].to_json())
    (path / "config.json").write_text(json.dumps({"layers": 3, "init_channels": 4}))
    return alphas, history


def _write_sweep(path, name, base):
    path.mkdir()
    with open(path / plots.TABLE, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["genotype", "layers", "test_accuracy", "best_test_accuracy", "params_m"])
        for layers in (2, 3, 5):
            writer.writerow([name, layers, base + layers, base + layers + 0.5, 0.1 * layers])
    return path


@pytest.fixture
def search_dir(tmp_path):
    path = tmp_path / "search"
    path.mkdir()
    alphas, history = _write_search_dir(path)
    return path, alphas, history


def test_edge_endpoints_follow_darts_order():
    assert [plots.steps_of(n) for n in (2, 5, 9, 14)] == [1, 2, 3, 4]
    assert plots.edge_endpoints(5) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert plots.state_name(3) == "1"
    with pytest.raises(UserInputError, match="6 edges do not make a DARTS cell"):
        plots.steps_of(6)


@pytest.mark.parametrize("genotype", [G.PIBCONV, G.DARTS_V2, TWO_NODES], ids=lambda g: g.steps)
def test_cell_drawing_draws_every_edge(genotype):
    figure, drawn = plots.plot_cells(genotype)
    for axis, cell in zip(figure.axes, plots.CELLS, strict=True):
        edges = getattr(genotype, cell)
        expected = [(op, j, i // 2) for i, (op, j) in enumerate(edges)]
        assert drawn[cell] == expected
        # The axis itself shows one label per edge and one arrow per edge and concat input.
        nodes = [*plots.INPUT_NAMES, *map(str, range(genotype.steps)), plots.OUTPUT_NAME]
        texts = collections.Counter(text.get_text() for text in axis.texts)
        assert texts == collections.Counter(nodes) + collections.Counter(op for op, _ in edges)
        arrows = [p for p in axis.patches if isinstance(p, patches.FancyArrowPatch)]
        concat = getattr(genotype, f"{cell}_concat")
        assert len(arrows) == len(edges) + len(concat)
    plt.close(figure)


def test_alpha_panels_plot_the_stored_weights(search_dir):
    _, alphas, _ = search_dir
    weights = alphas["normal"]
    figure = plots.plot_alpha_evolution(weights, PRIMITIVES, edges=[0, 7])
    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert len(panels) == 2
    for axis, edge in zip(panels, [0, 7], strict=True):
        assert len(axis.lines) == len(PRIMITIVES)
        for k, line in enumerate(axis.lines):
            np.testing.assert_allclose(line.get_ydata(), weights[:, edge, k])
            np.testing.assert_array_equal(line.get_xdata(), np.arange(1, EPOCHS + 1))
    assert "node 2" in panels[1].get_title()  # edge 7 of 9: node 2 reads node 1 (state 3)
    plt.close(figure)
    with pytest.raises(UserInputError, match=r"--edges \[9\] must list edge indices in 0..8"):
        plots.plot_alpha_evolution(weights, PRIMITIVES, edges=[9])


def test_search_curves_show_top1_error_in_percent(search_dir):
    path, _, _ = search_dir
    figure = plots.plot_search_curves(plots.read_jsonl(path / runs.METRICS))
    error_axis, loss_axis = figure.axes
    lines = {line.get_label(): line for line in error_axis.lines}
    assert set(lines) == {"train", "val"}
    np.testing.assert_allclose(lines["train"].get_ydata(), [80.0, 70.0, 60.0, 50.0])
    np.testing.assert_allclose(lines["val"].get_ydata(), [85.0, 75.0, 65.0, 55.0])
    assert {line.get_label() for line in loss_axis.lines} == {"train", "val"}
    plt.close(figure)


def test_search_genotype_prefers_the_json_then_the_history_then_the_alphas(search_dir):
    path, alphas, history = search_dir
    assert plots.search_genotype(path) == history[-1]
    (path / runs.GENOTYPE).write_text(G.PIBCONV.to_json())
    assert plots.search_genotype(path) == G.PIBCONV
    os.remove(path / runs.GENOTYPE)
    with open(path / runs.GENOTYPES, "a") as stream:
        stream.write('{"epoch": 5, "genot')  # a line torn by a running search
    assert plots.search_genotype(path) == history[-1]
    os.remove(path / runs.GENOTYPES)
    derived = plots.search_genotype(path)
    assert derived.normal == G.derive_cell(alphas["normal"][-1], PRIMITIVES, STEPS)
    assert derived.search_space == "pibconv"


def test_sweep_rows_are_read_by_column_meaning(tmp_path):
    table = tmp_path / "other.csv"
    table.write_text(
        "layers,genotype,params,best_acc,top1_acc\n2,A,400000,0.9,0.85\n3,A,500000,0.92,0.875\n"
    )
    rows = plots.read_sweep_rows([str(table)])
    assert [r["accuracy"] for r in rows] == pytest.approx([85.0, 87.5])
    assert [r["params_m"] for r in rows] == pytest.approx([0.4, 0.5])
    assert [r["layers"] for r in rows] == [2, 3]
    table.write_text("genotype,test_accuracy\nA,90\n")
    with pytest.raises(UserInputError, match="has no layers column"):
        plots.read_sweep_rows([str(table)])


def test_accuracy_vs_layers_averages_repeated_rows(tmp_path):
    a = _write_sweep(tmp_path / "a", "PIBCONV", 90.0)
    b = _write_sweep(tmp_path / "b", "PIBCONV", 92.0)  # a second seed of the same genotype
    c = _write_sweep(tmp_path / "c", "DARTS_V2", 80.0)
    rows = plots.read_sweep_rows([str(a), str(b / plots.TABLE), str(c)])
    figure = plots.plot_accuracy_vs(rows, "layers")
    lines = {bars.get_label(): bars.lines[0] for bars in figure.axes[0].containers}
    assert set(lines) == {"PIBCONV", "DARTS_V2"}
    np.testing.assert_allclose(np.asarray(lines["PIBCONV"].get_ydata(), float), [93, 94, 96])
    np.testing.assert_allclose(np.asarray(lines["DARTS_V2"].get_xdata(), float), [2, 3, 5])
    plt.close(figure)


def test_config_refuses_bad_requests(search_dir, tmp_path):
    path, _, _ = search_dir
    with pytest.raises(UserInputError, match="Nothing to plot"):
        plots.make_figures(plots.PlotConfig(output_dir=str(tmp_path / "out")))
    with pytest.raises(UserInputError, match="--formats"):
        plots.make_figures(plots.PlotConfig(str(tmp_path / "out"), str(path), formats=["gif"]))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserInputError, match="is an input directory"):
        plots.make_figures(plots.PlotConfig(output_dir=str(path), search_dir=str(path)))


def _apps(*commands):
    """Runs apps.plot once per argument list; returns CompletedProcesses."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return [app_process.run_app("apps.plot", *args, env=env, timeout=300) for args in commands]


def _picture(path):
    picture = np.asarray(Image.open(path).convert("RGB"), np.float32)
    assert picture.std() > 5, f"{path} is blank"
    assert (picture < 250).mean() > 0.01, f"{path} is nearly all white"
    return picture


@pytest.mark.slow
def test_app_draws_every_figure(search_dir, tmp_path):
    path, alphas, history = search_dir
    sweep = _write_sweep(tmp_path / "sweep", "PIBCONV", 90.0)
    out = tmp_path / "figures"
    ok, empty = _apps(
        [
            f"--search_dir={path}",
            f"--sweep_csv={sweep}",
            "--genotype=DARTS_V2",
            "--edges=0,1,2,8",
            "--formats=png,svg",
            f"--output_dir={out}",
        ],
        [f"--search_dir={tmp_path / 'sweep'}", f"--output_dir={tmp_path / 'unused'}"],
    )
    assert ok.returncode == 0, ok.stderr
    names = [
        "alphas_normal",
        "alphas_reduce",
        "search_curves",
        "cells_search",
        "cells_DARTS_V2",
        "accuracy_vs_layers",
        "accuracy_vs_params",
    ]
    for name in names:
        assert (out / f"{name}.svg").stat().st_size > 1000
        _picture(out / f"{name}.png")
    # Sizes: 4 alpha panels in one row; the cells of a 3-node genotype; two stacked cells.
    alpha_png = _picture(out / "alphas_normal.png")
    expected = plots.plot_alpha_evolution(alphas["normal"], PRIMITIVES, [0, 1, 2, 8])
    width, height = expected.get_size_inches() * 100
    assert alpha_png.shape[:2] == (round(height), round(width))
    cells, _ = plots.plot_cells(history[-1])
    width, height = cells.get_size_inches() * 100
    assert _picture(out / "cells_search.png").shape[:2] == (round(height), round(width))
    plt.close("all")
    config = json.loads((out / "config.json").read_text())
    assert config["edges"] == [0, 1, 2, 8] and len(config["written"]) == 2 * len(names)

    assert empty.returncode == 1
    assert f"error: Search directory '{tmp_path / 'sweep'}' has no alphas.npz" in empty.stderr
    assert "Traceback" not in empty.stderr
    assert not (tmp_path / "unused").exists()
