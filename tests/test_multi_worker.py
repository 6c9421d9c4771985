"""`--strategy=multi_worker_mirrored` with two worker processes on localhost (issue 20).

Each worker is one process with its own TF_CONFIG (free ports on 127.0.0.1) and one CPU
thread; together they take the steps of one process with the same global batch
(synchronized BatchNorm: the statistics are the global batch's on both). Only the chief
(worker 0) writes the run directory; worker 1 writes to a temporary directory it deletes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pibconv_tf import runs

REPO = Path(__file__).resolve().parents[1]

# Both apps: digits at 8x8, batches of 8, 3 steps per epoch, 2 epochs, one thread each.
_SHARED = [
    "--dataset=digits",
    "--image_size=8",
    "--batch_size=8",
    "--steps_per_epoch=3",
    "--epochs=2",
    "--sync_batch_norm",
    "--intra_op_threads=1",
    "--inter_op_threads=1",
    "--verbose=0",
]
_SEARCH = ["-m", "apps.search", *_SHARED, "--layers=3", "--nodes=1", "--init_channels=4"]
_TRAIN = [
    *("-m", "apps.train", *_SHARED, "--layers=2", "--init_channels=4", "--cutout_length=4"),
    "--drop_path_prob=0",  # masks are drawn per replica: not one process's
]
_COMPARED = {
    "search": ("loss", "accuracy", "grad_norm", "val_loss", "val_accuracy"),
    "train": ("loss", "accuracy", "test_loss", "test_accuracy"),
}


def _ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(command, model_dir, tf_config=None, resume=False):
    scratch = model_dir.parent / "tmp"  # where a worker's temporary directory goes
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    env["TMPDIR"] = str(scratch)
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    flags = ["--resume"] if resume else list(command[2:])
    if tf_config is not None and not resume:
        flags.append("--strategy=multi_worker_mirrored")
    return subprocess.Popen(
        [sys.executable, *command[:2], *flags, f"--model_dir={model_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _workers(command, model_dir, resume=False):
    workers = [f"127.0.0.1:{port}" for port in _ports(2)]
    return [
        _start(
            command,
            model_dir,
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}},
            resume=resume,
        )
        for index in range(2)
    ]


def _finish(process, timeout=600):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def _alphas(model_dir):
    stored = np.load(model_dir / runs.ALPHAS)
    return {key: stored[key] for key in stored.files}


@pytest.mark.slow
@pytest.mark.parametrize("app", ["search", "train"])
def test_two_workers_run_like_one_process_and_resume_after_a_worker_is_killed(app, tmp_path):
    command = {"search": _SEARCH, "train": _TRAIN}[app]
    single, multi = tmp_path / "single", tmp_path / "multi"
    # The reference: one process under a one-device MirroredStrategy (runs under a strategy
    # draw their random numbers alike; the default strategy's differ).
    reference = _start([*command, "--strategy=mirrored"], single)
    workers = _workers(command, multi)
    # Worker 1 is killed once the chief has saved epoch 1: the chief cannot go on alone.
    checkpoint = multi / runs.CHECKPOINT_DIR / "epoch-0001.npz"
    start = time.monotonic()
    while not checkpoint.exists():
        assert workers[0].poll() is None, workers[0].communicate()[1][-3000:]
        assert time.monotonic() - start < 600, "no checkpoint of epoch 1"
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGKILL)
    workers[0].send_signal(signal.SIGKILL)  # stuck in a collective without its peer
    for worker in workers:
        worker.wait(timeout=60)
    assert len((multi / runs.METRICS).read_text().splitlines()) == 1
    killed = set((tmp_path / "tmp").glob(f"{runs.WORKER_PREFIX}*"))  # SIGKILL: left behind
    # Restarted on new ports, both resume from the chief's checkpoint.
    for worker in _workers(command, multi, resume=True):
        _finish(worker)
    _finish(reference)

    ours, theirs = (
        [json.loads(line) for line in (d / runs.METRICS).open()] for d in (multi, single)
    )
    assert [r["epoch"] for r in ours] == [r["epoch"] for r in theirs] == [1, 2]
    # The same steps: the same losses, accuracies (and weight-gradient norms), epoch after
    # epoch. (The search's alphas are not compared: Adam's first steps move an alpha by its
    # learning rate in the direction of its gradient's sign, and some gradients are zero up
    # to rounding.)
    for mine, reference in zip(ours, theirs, strict=True):
        for name in _COMPARED[app]:
            np.testing.assert_allclose(mine[name], reference[name], rtol=1e-4, err_msg=name)
    # Only the chief wrote here; the resumed worker's temporary directory is gone.
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    assert set((tmp_path / "tmp").glob(f"{runs.WORKER_PREFIX}*")) == killed
