"""Tests for pibconv_tf/runs.py and checkpoints.py: run directories, locks and checkpoints."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pibconv_tf import files, optim, runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import genotypes as G
from pibconv_tf.model import networks
from pibconv_tf.model.search_network import SearchNetwork, build_network


def _network():
    return networks.network_cifar(G.PIBCONV, 10, 4, 2, auxiliary=True, image_size=16)


def test_a_training_checkpoint_holds_exactly_the_network_and_optimizer_variables(tmp_path):
    network = _network()
    optimizer = optim.TorchSGD(0.1, 0.9)
    optimizer.build(network.trainable_variables)
    # The BatchNorm statistics inside the cells' operations are among them (TensorFlow's
    # own object graph of the model missed those: 16 of 104 variables).
    inner = [v for v in network.non_trainable_variables if "edge_" in v.path]
    assert any("moving_mean" in v.path for v in inner)
    saved = runs.RunDir(tmp_path).checkpoints(network=network, optimizer=optimizer)
    path = saved.save(3)
    with np.load(path) as archive:
        keys = set(archive.files) - {"__meta__"}
    assert keys == {f"network/{v.path}" for v in network.variables} | {
        f"optimizer/{v.path}" for v in optimizer.variables
    }


def test_a_search_checkpoint_holds_exactly_the_search_network_variables(tmp_path):
    network = build_network(SearchNetwork(10, 4, 3, steps=2, multiplier=2), 8)
    path = runs.RunDir(tmp_path).checkpoints(network=network).save(1)
    with np.load(path) as archive:
        assert len(archive.files) - 1 == len(network.variables)
    assert any("alphas_normal" in v.path for v in network.variables)


def _perturbed(network, scale):
    for variable in network.trainable_variables:
        variable.assign(variable.numpy() + scale)


def test_restore_gives_back_the_values_and_keeps_the_newest_two(tmp_path):
    network = _network()
    saved = runs.RunDir(tmp_path).checkpoints(network=network)
    values = {}
    for epoch in (1, 2, 3):
        _perturbed(network, 0.1)
        saved.save(epoch)
        values[epoch] = [v.numpy().copy() for v in network.trainable_variables]
    saved.save(3, step=5)  # an interrupted epoch 4
    assert [e["file"] for e in saved.entries()] == ["epoch-0003-step-000005.npz", "epoch-0003.npz"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "epoch-0003-step-000005.npz",
        "epoch-0003.npz",
        "index.json",
    ]
    _perturbed(network, 1.0)
    entry = saved.restore()
    assert (entry["epoch"], entry["step"]) == (3, 5)
    for variable, value in zip(network.trainable_variables, values[3], strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_restores(tmp_path, capsys, damage):
    network = _network()
    saved = runs.RunDir(tmp_path).checkpoints(network=network)
    saved.save(1)
    first = [v.numpy().copy() for v in network.variables]
    _perturbed(network, 0.5)
    newest = tmp_path / "checkpoints" / "epoch-0002.npz"
    saved.save(2)
    content = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\0" * len(content))
    else:
        newest.unlink()
    before = {
        name: (tmp_path / "checkpoints" / name).read_bytes()
        for name in os.listdir(tmp_path / "checkpoints")
    }
    entry = runs.RunDir(tmp_path).checkpoints(network=network).restore()
    assert entry["epoch"] == 1
    for variable, value in zip(network.variables, first, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    message = capsys.readouterr().err
    assert "epoch-0002.npz" in message and "damaged" in message
    after = {
        name: (tmp_path / "checkpoints" / name).read_bytes()
        for name in os.listdir(tmp_path / "checkpoints")
    }
    assert after == before  # the restore changed nothing on disk


def test_a_damaged_index_falls_back_to_the_files(tmp_path, capsys):
    network = _network()
    saved = runs.RunDir(tmp_path).checkpoints(network=network)
    saved.save(1)
    saved.save(2)
    (tmp_path / "checkpoints" / "index.json").write_text("{not json")
    assert saved.restore()["epoch"] == 2
    assert "index" in capsys.readouterr().err


def test_no_intact_checkpoint_is_one_sentence(tmp_path):
    network = _network()
    saved = runs.RunDir(tmp_path).checkpoints(network=network)
    saved.save(1)
    (tmp_path / "checkpoints" / "epoch-0001.npz").write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="No checkpoint in .* restores"):
        saved.restore()


def test_a_checkpoint_of_another_network_is_refused_by_name(tmp_path):
    runs.RunDir(tmp_path).checkpoints(network=_network()).save(1)
    other = networks.network_cifar(G.DARTS_V2, 10, 4, 2, image_size=16)
    with pytest.raises(UserInputError, match="does not match the run being resumed"):
        runs.RunDir(tmp_path).checkpoints(network=other).restore()


_HOLD = """
import sys, time
from pibconv_tf import runs
runs.RunDir.prepare(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_a_directory_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    directory = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserInputError, match=f"in use by process {holder.pid}"):
            runs.RunDir.prepare(directory, overwrite=True)
        assert (directory / runs.LOCK).exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale.
    run = runs.RunDir.prepare(directory, overwrite=True)
    assert f"process {holder.pid} no longer runs there" in capsys.readouterr().err
    assert json.loads((directory / runs.LOCK).read_text())["pid"] == os.getpid()
    run.release()
    assert not (directory / runs.LOCK).exists()


def test_same_directory_resolves_slashes_and_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    assert runs.same_directory("run", str(tmp_path / "run") + "/")
    assert runs.same_directory("./run/", "run")
    assert not runs.same_directory("run", "other")


def test_atomic_files_have_the_usual_permissions(tmp_path):
    runs.write_text_atomic(tmp_path / "a.json", "{}")
    with files.atomic_file(tmp_path / "b.npz", "wb") as stream:
        stream.write(b"x")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("a.json", "b.npz"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o666 & ~mask


def test_first_step_says_it_traces_before_the_first_batch_and_once_how_long(capsys):
    import keras  # noqa: PLC0415

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    seen = []

    class Batches(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(capsys.readouterr().out)

    first = runs.FirstStep("search step (first order)")
    x, y = np.zeros((8, 3), np.float32), np.zeros((8, 2), np.float32)
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[first, Batches()])
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[first])  # a resumed run's
    assert seen[0] == (
        "Tracing and compiling the search step (first order); the first batch waits for it.\n"
    )
    assert seen[1].startswith("First batch done ") and seen[1].endswith(" s after the start.\n")
    assert "".join(seen[2:]) + capsys.readouterr().out == ""
    quiet = runs.FirstStep("training step", enabled=False)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[quiet])
    assert capsys.readouterr().out == ""
