"""Tests for pibconv_tf/search/run.py and apps/search.py: outputs, resume, bad input.

Runs are tiny (the embedded digits at 8x8, the 8-operation DARTS space, C=4, 3 cells of one
node, batches of 8, 2 steps per epoch). The library runs in-process and eagerly (each mixed
operation still runs as a traced function); the app runs in a subprocess, traced as users
run it.
"""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from pibconv_tf.errors import RunError, UserInputError
from pibconv_tf.model.genotypes import Genotype
from pibconv_tf.model.search_network import MixedOp, SearchNetwork, build_network
from pibconv_tf.search.config import SearchConfig
from pibconv_tf.search.run import run_search
from pibconv_tf.search.trainer import SearchTrainer
from tests import app_process

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {
    "dataset": "digits",
    "image_size": 8,
    "search_space": "darts",
    "init_channels": 4,
    "layers": 3,
    "nodes": 1,
    "epochs": 2,
    "batch_size": 8,
    "steps_per_epoch": 2,
    "run_eagerly": True,
    "verbose": 0,
}
DIVERGING = {"learning_rate": 1e38, "learning_rate_min": 1e37, "grad_clip": 1e38}
OUTPUTS = ("config.json", "genotype.json", "genotypes.jsonl", "alphas.npz", "metrics.jsonl")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("search") / "complete"
    genotype = run_search({**TINY, "model_dir": str(model_dir)})
    return model_dir, genotype


@pytest.mark.slow
def test_search_writes_every_output_and_moves_the_alphas(complete_run):
    model_dir, genotype = complete_run
    for name in OUTPUTS:
        assert (model_dir / name).is_file(), name
    assert any((model_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert (model_dir / "checkpoints" / "epoch-0002.npz").is_file()
    assert Genotype.from_json((model_dir / "genotype.json").read_text()) == genotype
    assert genotype.search_space == "darts"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["layers"] == 3 and config["learning_rate"] == 0.0025
    assert config["dataset_info"]["name"] == "digits"

    with np.load(model_dir / "alphas.npz") as alphas:
        normal, reduce = alphas["normal"], alphas["reduce"]
        assert list(alphas["primitives"])[0] == "none"
    assert normal.shape == reduce.shape == (2, 2, 8)  # epochs x edges x operations
    np.testing.assert_allclose(normal.sum(axis=-1), 1.0, rtol=1e-5)
    assert np.abs(normal - 1 / 8).max() > 1e-5  # moved away from the ~uniform start
    assert np.abs(normal[1] - normal[0]).max() > 1e-6  # and again in epoch 2

    genotypes = read_jsonl(model_dir / "genotypes.jsonl")
    assert [g["epoch"] for g in genotypes] == [1, 2]
    assert Genotype.from_dict(genotypes[-1]["genotype"]) == genotype
    metrics = read_jsonl(model_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    assert metrics[0]["lr"] == pytest.approx(0.0025)
    assert metrics[1]["lr"] == pytest.approx(0.001 + 0.0015 * 0.5)  # cosine at epoch 1 of 2


@pytest.mark.slow
def test_resume_ends_with_the_files_of_an_uninterrupted_run(complete_run, tmp_path):
    complete_dir, genotype = complete_run
    model_dir = tmp_path / "interrupted"
    run_search({**TINY, "model_dir": str(model_dir), "stop_after_epoch": 1})
    assert not (model_dir / "genotype.json").exists()
    assert len(read_jsonl(model_dir / "metrics.jsonl")) == 1
    resumed = run_search({**TINY, "model_dir": str(model_dir), "resume": True})

    assert resumed == genotype
    assert (model_dir / "genotype.json").read_text() == (complete_dir / "genotype.json").read_text()
    assert read_jsonl(model_dir / "genotypes.jsonl") == read_jsonl(complete_dir / "genotypes.jsonl")
    # A resume that lost the optimiser state or the data position moves the alphas by
    # ~1e-5 (softmax of Adam steps of 3e-4); rounding differences are ~1e-8.
    with np.load(model_dir / "alphas.npz") as got, np.load(complete_dir / "alphas.npz") as want:
        for kind in ("normal", "reduce"):
            np.testing.assert_allclose(got[kind], want[kind], rtol=0, atol=1e-7)
    got, want = read_jsonl(model_dir / "metrics.jsonl"), read_jsonl(complete_dir / "metrics.jsonl")
    assert [m["epoch"] for m in got] == [1, 2]
    for a, b in zip(got, want, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model_dir = tmp_path / "diverging"
    # One step per epoch, an absurd learning rate and no effective clipping: epoch 1's loss
    # is computed before its update and is finite; epoch 2's logits overflow float32 (the
    # classifier is the one layer that no BatchNorm makes scale-invariant).
    diverging = DIVERGING
    config = {**TINY, **diverging, "steps_per_epoch": 1, "epochs": 4}
    with pytest.raises(RunError, match="non-finite") as error:
        run_search({**config, "model_dir": str(model_dir)})
    assert "epoch 2, batch 1" in str(error.value) and "last good checkpoint" in str(error.value)
    assert not (model_dir / "genotype.json").exists()
    assert sorted(p.name for p in (model_dir / "checkpoints").glob("*.npz")) == ["epoch-0001.npz"]
    with np.load(model_dir / "checkpoints" / "epoch-0001.npz") as saved:
        for name in saved.files:
            if saved[name].dtype.kind == "f":
                assert np.isfinite(saved[name]).all(), name
    # The bad epoch's metrics are recorded (for the post-mortem); a resume truncates them.
    assert [m["epoch"] for m in read_jsonl(model_dir / "metrics.jsonl")] == [1, 2]
    assert np.isfinite(read_jsonl(model_dir / "metrics.jsonl")[0]["loss"])


def test_non_finite_loss_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path):
    with pytest.raises(RunError, match="no checkpoint to resume from"):
        run_search({**TINY, **DIVERGING, "model_dir": str(tmp_path / "run")})


def test_zero_steps_per_epoch_means_all_as_in_the_train_app():
    # apps.demo passes --steps_per_epoch=0 to both apps: "all", never an error.
    base = {**TINY, "model_dir": "unused"}
    assert SearchConfig.from_dict({**base, "steps_per_epoch": 0}).validate().steps_per_epoch == 0
    with pytest.raises(ValueError, match="--steps_per_epoch=-1"):
        SearchConfig.from_dict({**base, "steps_per_epoch": -1}).validate()


def test_resume_refuses_a_changed_network(complete_run):
    model_dir, _ = complete_run
    before = (model_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="--init_channels=8 differs"):
        run_search({**TINY, "model_dir": str(model_dir), "resume": True, "init_channels": 8})
    assert (model_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("train_portion", 1.5, "--train_portion=1.5"),
        ("layers", 2, "--layers=2"),
        ("search_space", "nope", "--search_space='nope'"),
        ("learning_rate_min", 0.1, "--learning_rate_min=0.1"),
        ("model_dir", None, "--model_dir is required"),
    ],
)
def test_config_validation_names_the_setting(setting, value, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig.from_dict({**TINY, "model_dir": "unused", setting: value}).validate()


def test_noinline_traces_with_sync_batch_norm_is_refused():
    # Synchronized BatchNorm traces edges one by one: there are no shared traces to call.
    values = {**TINY, "model_dir": "unused", "sync_batch_norm": True, "inline_traces": False}
    with pytest.raises(ValueError, match="--noinline_traces has no effect with --sync_batch"):
        SearchConfig.from_dict(values).validate()
    SearchConfig.from_dict({**values, "inline_traces": True}).validate()
    # Unset (the default), neither flag is refused: they resolve to what the edges can do.
    defaults = {**TINY, "model_dir": "unused", "sync_batch_norm": True}
    SearchConfig.from_dict(defaults).validate()


def test_the_default_step_calls_its_shared_traces_and_recomputes_them():
    from pibconv_tf.search.shared_trace import SharedTraces  # noqa: PLC0415

    assert SearchConfig().inline_traces is None and SearchConfig().recompute is None
    network = build_network(SearchNetwork(3, 4, 3, steps=1, multiplier=1), 8)
    trainer = SearchTrainer(network)
    assert (trainer.inline_traces, trainer.recompute) == (False, True)
    ops = [x for x in network._flatten_layers(include_self=False) if isinstance(x, MixedOp)]
    (executor,) = {id(op.executor): op.executor for op in ops}.values()
    assert isinstance(executor, SharedTraces)
    assert (executor.inline, executor.recompute) == (False, True)
    # Without shared traces (synchronized BatchNorm) the unset default turns itself off.
    unshared = SearchTrainer(network, share_traces=False)
    assert (unshared.inline_traces, unshared.recompute) == (False, False)


def test_recompute_needs_the_shared_traces(monkeypatch):
    values = {**TINY, "model_dir": "unused", "sync_batch_norm": True, "recompute": True}
    with pytest.raises(ValueError, match="--recompute works through the shared traces"):
        SearchConfig.from_dict(values).validate()
    SearchConfig.from_dict({**values, "sync_batch_norm": False}).validate()
    network = build_network(SearchNetwork(3, 4, 3, steps=1, multiplier=1), 8)
    with pytest.raises(ValueError, match="--recompute runs through TensorFlow's shared"):
        SearchTrainer(network, share_traces=False, recompute=True)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="not offered on JAX"):
        SearchTrainer(network, recompute=True)


def run_app(*args):
    return app_process.run_app("apps.search", *args)


APP_TINY = [
    "--dataset=digits",
    "--image_size=8",
    "--search_space=darts",
    "--init_channels=4",
    "--layers=3",
    "--nodes=1",
    "--batch_size=8",
    "--steps_per_epoch=2",
    "--verbose=0",
]


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--search_space=resnet", "--search_space='resnet' is not valid"),
        ("--train_portion=1.0", "--train_portion=1.0 is not valid"),
    ],
)
def test_app_rejects_bad_input_with_one_sentence(tmp_path, flag, expected):
    result = run_app(*APP_TINY, f"--model_dir={tmp_path / 'run'}", "--epochs=1", flag)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_app_refuses_a_non_empty_model_dir(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "notes.txt").write_text("keep me")
    result = run_app(*APP_TINY, f"--model_dir={model_dir}", "--epochs=1")
    assert result.returncode == 1
    assert "is not empty; pass --resume" in result.stderr.strip().splitlines()[-1]
    assert [p.name for p in model_dir.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_app_runs_a_traced_first_order_search(tmp_path):
    model_dir = tmp_path / "run"
    result = run_app(*APP_TINY, f"--model_dir={model_dir}", "--epochs=1")
    assert result.returncode == 0, result.stderr
    genotype = Genotype.from_json((model_dir / "genotype.json").read_text())
    assert json.loads(result.stdout[result.stdout.index("{") :]) == genotype.to_dict()
    for name in OUTPUTS:
        assert (model_dir / name).is_file(), name
    # Resuming the finished search changes nothing and needs no flag but --model_dir.
    before = {p.name: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    again = run_app("--resume", f"--model_dir={model_dir}/")  # the same directory, a slash more
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is complete (1 epochs); nothing to do" in again.stdout
    assert {p.name: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    refused = run_app("--resume", f"--model_dir={model_dir}", "--layers=4")
    assert refused.returncode == 1
    assert "--layers=4 differs from the run being resumed (3)" in refused.stderr
    # How the step runs its shared traces is not part of the run: it may change on resume.
    called = run_app("--resume", f"--model_dir={model_dir}", "--inline_traces", "--norecompute")
    assert called.returncode == 0, called.stderr[-3000:]
    assert "nothing to do" in called.stdout


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_resume_gives_the_alphas_of_an_uninterrupted_search(tmp_path):
    """The app, traced: a SIGINT in epoch 2 saves the step; --model_dir alone resumes; the
    alphas and genotypes equal those of a search that never stopped; with beta-DARTS' term,
    whose coefficient the resumed epoch takes up where the schedule has it."""
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415

    long = [*APP_TINY, "--epochs=2", "--steps_per_epoch=30", "--beta_regularization=4"]
    straight = run_app(*long, f"--model_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    model_dir = tmp_path / "stopped"
    command = [sys.executable, "-m", "apps.search", *long, f"--model_dir={model_dir}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (model_dir / "checkpoints" / "epoch-0001.npz").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()[-3000:]
    assert b"Continue with: python -m apps.search --resume" in stderr
    resumed = run_app("--resume", f"--model_dir={model_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after step" in resumed.stdout
    with (
        np.load(model_dir / "alphas.npz") as got,
        np.load(tmp_path / "straight" / "alphas.npz") as want,
    ):
        for kind in ("normal", "reduce"):
            np.testing.assert_allclose(got[kind], want[kind], rtol=0, atol=1e-7)
    assert read_jsonl(model_dir / "genotypes.jsonl") == read_jsonl(
        tmp_path / "straight" / "genotypes.jsonl"
    )
    metrics = read_jsonl(model_dir / "metrics.jsonl")
    assert [m["beta_coefficient"] for m in metrics] == [0.0, 2.0]


def test_early_stop_derives_the_genotype_where_it_stopped_and_resume_is_complete(
    tmp_path, monkeypatch, capsys
):
    from pibconv_tf.search import run as search_run  # noqa: PLC0415

    # DARTS+' criterion is "2 or more skips in the normal cell"; at 0 it holds at epoch 1.
    monkeypatch.setattr(search_run, "EARLY_STOP_SKIPS", 0)
    model_dir = tmp_path / "early"
    config = {**TINY, "epochs": 3, "early_stop": True, "max_skip": 0, "model_dir": str(model_dir)}
    genotype = run_search(config)
    assert "Early stop after epoch 1" in capsys.readouterr().out
    records = read_jsonl(model_dir / "genotypes.jsonl")
    assert [r["epoch"] for r in records] == [1] and records[0]["stopped_early"]
    assert [m["epoch"] for m in read_jsonl(model_dir / "metrics.jsonl")] == [1]
    written = Genotype.from_json((model_dir / "genotype.json").read_text())
    assert written == genotype and all(op != "skip_connect" for op, _ in written.normal)
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    again = run_search({**config, "resume": True})
    assert again == genotype
    assert "complete (stopped early after epoch 1 of 3)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_seed_protocol_selects_the_best_validation_and_resumes(tmp_path, capsys):
    from pibconv_tf.search import seeds  # noqa: PLC0415

    model_dir = tmp_path / "seeds"
    config = SearchConfig.from_dict({**TINY, "epochs": 1, "model_dir": str(model_dir)})
    summary = seeds.run_seeds(config, (0, 1, 2))
    rows = summary["runs"]
    assert [row["seed"] for row in rows] == [0, 1, 2]
    best = max(rows, key=lambda row: (row["val_accuracy"], -row["seed"]))
    assert summary["selected_seed"] == best["seed"]
    assert json.loads((model_dir / "genotype.json").read_text()) == best["genotype"]
    for row in rows:  # each seed's own search, its own genotype file
        stored = json.loads((model_dir / f"seed_{row['seed']}" / "genotype.json").read_text())
        assert stored == row["genotype"]
        assert (
            json.loads((model_dir / f"seed_{row['seed']}" / "config.json").read_text())["seed"]
            == row["seed"]
        )
    counts = summary["operation_counts"]
    assert sum(counts["normal"].values()) == sum(counts["reduce"].values()) == 3 * 2
    assert "(selected)" in (model_dir / "seeds.md").read_text()
    # Resumed: every search is complete, nothing is searched again.
    before = {p: p.stat().st_mtime_ns for p in model_dir.glob("seed_*/**/*") if p.is_file()}
    capsys.readouterr()
    again = seeds.run_seeds(SearchConfig.from_dict({**config.to_dict(), "resume": True}), (0, 1, 2))
    assert again["selected_seed"] == summary["selected_seed"]
    assert capsys.readouterr().out.count("is complete") == 3
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(UserInputError, match="--seeds=0,1 differs from the protocol"):
        seeds.run_seeds(SearchConfig.from_dict({**config.to_dict(), "resume": True}), (0, 1))
    with pytest.raises(UserInputError, match="lists a seed twice"):
        seeds.check_seeds((1, 1))
