"""Run directories that users can trust: refuse to clobber, resume, write atomically.

Also the run files' names, and the callbacks that search and training share: each epoch
appends one JSON line to `metrics.jsonl`, saves a checkpoint of everything needed to resume
(models, optimizers, the epoch counter), and a non-finite loss stops the run before a bad
checkpoint is written.

A run directory (`--model_dir`) holds `config.json`, JSON-lines logs, TensorBoard logs and
checkpoints. Starting a run into a non-empty directory needs `--resume` (continue from the
last checkpoint) or `--overwrite` (start over); anything else is refused before a file is
touched.
"""

import atexit
import contextlib
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

import keras
import numpy as np

from pibconv_tf import checkpoints
from pibconv_tf.errors import RunError, UserInputError
from pibconv_tf.files import write_text_atomic

# The names of the files in a run directory (search, training, sweeps, roadmaps).
CONFIG = "config.json"  # the resolved configuration
CHECKPOINT_DIR = "checkpoints"
METRICS = "metrics.jsonl"  # one line per epoch
TENSORBOARD = "tensorboard"
GENOTYPE = "genotype.json"  # a search's result; a training run's own copy
GENOTYPES = "genotypes.jsonl"  # a search's genotype after every epoch
ALPHAS = "alphas.npz"  # a search's softmax(alpha) after every epoch
DATASET = "dataset.json"  # class names, mean and std of the training data
MODEL = "model.keras"  # the trained logits-only float32 model
BEST_MODEL = "model_best.keras"
BEST = "best.json"  # the epoch and test top-1 of model_best.keras
RESULT = "result.json"  # a finished training run's summary
LOCK = ".lock"  # the process running in the directory
WORKER_PREFIX = "pibconv-worker-"  # a multi-worker run's non-chief directories (temporary)


class RunDir:
    """A prepared run directory.

    Attributes:
        path: the directory.
        resumed: whether the run continues a previous one (a checkpoint exists).
    """

    def __init__(self, path, resumed=False):
        self.path = pathlib.Path(path)
        self.resumed = resumed
        self._lock = None
        self._temporary = False

    @classmethod
    def prepare(cls, path, resume=False, overwrite=False, lock=True, chief=True):
        """Validates `path` for a new or resumed run, creating or emptying it as asked.

        With `lock`, the directory is locked for this process (`RunLock`) before anything
        in it changes; a second run on it is refused.

        A worker of a multi-worker run that is not its chief (`chief=False`) gets a
        temporary directory instead, as TensorFlow's multi-worker guide asks: it runs the
        same steps as the chief (their collectives must match), writes its files there and
        deletes them at `release`; on `--resume` it starts from a copy of the chief's
        directory (a file system the workers share). Only the chief writes `path`.
        """
        if not chief:
            return cls._prepare_worker(path, resume)
        if not path:
            raise UserInputError("--model_dir is required: where the run writes its outputs.")
        if resume and overwrite:
            raise UserInputError("--resume and --overwrite contradict each other; pass one.")
        path = pathlib.Path(path)
        if path.exists() and not path.is_dir():
            raise UserInputError(f"--model_dir {str(path)!r} exists and is not a directory.")
        run = cls(path, resumed=resume)
        if resume:
            if not checkpoints.exists(path):
                if checkpoints.legacy(path):
                    raise UserInputError(
                        f"{str(path)!r} holds TensorFlow checkpoints of pibconv_tf 0.1, which "
                        "this version cannot resume; start a new run (its files stay)."
                    )
                raise UserInputError(
                    f"--resume was given but {str(path)!r} holds no checkpoint to resume from."
                )
            if lock:
                run._lock = RunLock.acquire(path)
            return run
        non_empty = path.is_dir() and any(path.iterdir())
        if non_empty and not overwrite:
            raise UserInputError(
                f"--model_dir {str(path)!r} is not empty; pass --resume to continue that run "
                "or --overwrite to replace it."
            )
        path.mkdir(parents=True, exist_ok=True)
        if lock:
            run._lock = RunLock.acquire(path)
        if non_empty:
            for child in path.iterdir():
                if child.name == LOCK:
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        return run

    @classmethod
    def _prepare_worker(cls, path, resume):
        path = pathlib.Path(path)
        if resume and not checkpoints.exists(path):
            raise UserInputError(
                f"--resume was given but {str(path)!r} holds no checkpoint to resume from "
                "(a worker reads the chief's --model_dir: is it on a shared file system?)."
            )
        scratch = pathlib.Path(tempfile.mkdtemp(prefix=WORKER_PREFIX))
        if resume:
            for child in path.iterdir():
                if child.name in (LOCK, TENSORBOARD):
                    continue
                copy = shutil.copytree if child.is_dir() else shutil.copy2
                copy(child, scratch / child.name)
        run = cls(scratch, resumed=resume)
        run._temporary = True
        atexit.register(run.release)
        return run

    def release(self):
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)
            self._temporary = False

    def file(self, name):
        return self.path / name

    def write_json(self, name, data):
        write_json_atomic(self.file(name), data)

    def read_json(self, name):
        return json.loads(self.file(name).read_text())

    def append_jsonl(self, name, record):
        with open(self.file(name), "a") as stream:
            stream.write(json.dumps(record, sort_keys=True) + "\n")

    def read_jsonl(self, name):
        path = self.file(name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_jsonl(self, name, keep):
        """Keeps the records for which `keep(record)` holds (drops epochs after a checkpoint)."""
        records = [record for record in self.read_jsonl(name) if keep(record)]
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        write_text_atomic(self.file(name), text)
        return records

    def checkpoints(self, keep=2, writer=True, **groups):
        """The run's `checkpoints.Checkpoints` of `groups` (models, optimizers, metrics)."""
        return checkpoints.Checkpoints(self.path, keep=keep, writer=writer, **groups)


class RunLock:
    """`<model_dir>/.lock`, naming the process that runs in the directory.

    A second run on the same directory is refused while that process lives; the lock of a
    process that died (killed, crashed) is taken over with a message. Released at exit.
    """

    def __init__(self, path):
        self.path = path

    @classmethod
    def acquire(cls, directory):
        path = pathlib.Path(directory) / LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is not None and _alive(holder):
                    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder["started"]))
                    raise UserInputError(
                        f"--model_dir {str(directory)!r} is in use by process {holder['pid']} "
                        f"on {holder['host']} (since {started}); wait for it to end, or stop "
                        "it, before starting another run there."
                    ) from None
                if holder is None or holder.get("pid") != os.getpid():
                    previous = (
                        "an unreadable lock" if holder is None else f"process {holder['pid']}"
                    )
                    print(
                        f"Taking over {str(path)!r}: {previous} no longer runs there.",
                        file=sys.stderr,
                        flush=True,
                    )
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as stream:
                json.dump(me, stream)
            lock = cls(path)
            atexit.register(lock.release)
            return lock
        raise UserInputError(f"Could not lock {str(path)!r}; another process keeps taking it.")

    def release(self):
        holder = _read_lock(self.path)
        if holder is not None and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _read_lock(path):
    try:
        holder = json.loads(pathlib.Path(path).read_text())
        return holder if isinstance(holder, dict) and "pid" in holder else None
    except (OSError, ValueError):
        return None


def _alive(holder):
    """Whether the lock's process still runs (this process's own lock counts as free: a
    run that ended in it without releasing, e.g. on an exception)."""
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: assume it runs
    pid = int(holder["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_directory(a, b):
    """Whether two --model_dir values name the same directory (trailing slashes, relative
    paths and symbolic links resolved)."""
    return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()


def has_checkpoint(path):
    """Whether the run directory `path` holds a checkpoint to resume from."""
    return checkpoints.exists(path)


def write_json_atomic(path, data):
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _python(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


def interrupted(model):
    """Whether `Interrupt` stopped the current epoch of `model`'s fit (its end is partial:
    nothing is logged, evaluated or checkpointed for it)."""
    return getattr(model, "interrupted_at", None) is not None


def sync_state(model):
    """Makes the variables of `model` (a trainer) what they are: a JAX fit's state written
    back into them, and the replicas' BatchNorm statistics reconciled (the trainer's
    `sync_replicas`) under a tf.distribute strategy."""
    for name in ("jax_state_sync", "sync_replicas"):
        sync = getattr(model, name, None)
        if sync is not None:
            sync()


class SyncState(keras.callbacks.Callback):
    """`sync_state` first thing at each epoch's end, before evaluation, logs and checkpoints
    read the variables."""

    def on_epoch_end(self, epoch, logs=None):
        sync_state(self.model)


class FirstStep(keras.callbacks.Callback):
    """Says, before the first batch, that the step is being traced and compiled (minutes for
    a search network on a CPU, with no other output meanwhile), and how long it took.

    Args:
        what: the step, e.g. "search step (first order)".
        enabled: print at all (the apps' verbosity).
    """

    def __init__(self, what, enabled=True):
        super().__init__()
        self.what = what
        self.enabled = enabled
        self._start = None

    def on_train_begin(self, logs=None):
        if self.enabled and self._start is None:
            self._start = time.perf_counter()
            print(
                f"Tracing and compiling the {self.what}; the first batch waits for it.",
                flush=True,
            )

    def on_train_batch_end(self, batch, logs=None):
        if self._start is not None and self.enabled:
            seconds = time.perf_counter() - self._start
            print(f"First batch done {seconds:.1f} s after the start.", flush=True)
            self.enabled = False


class EpochLogger(keras.callbacks.Callback):
    """Appends {"epoch", "seconds", **logs, **extra()} to `metrics.jsonl` after each epoch.

    Args:
        run_dir: a `RunDir`.
        extra: optional callable (epoch) -> dict of more fields (lr, drop path rate, ...).
        name: the JSON-lines file name.
    """

    def __init__(self, run_dir, extra=None, name=METRICS):
        super().__init__()
        self.run_dir = run_dir
        self.extra = extra
        self.name = name
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if interrupted(self.model):
            return
        record = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._start, 3)}
        record.update({key: _python(value) for key, value in (logs or {}).items()})
        if self.extra is not None:
            record.update({key: _python(value) for key, value in self.extra(epoch).items()})
        self.run_dir.append_jsonl(self.name, record)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the run's checkpoint after each complete epoch with a finite loss.

    Args:
        checkpoints: the run's `checkpoints.Checkpoints`.
    """

    def __init__(self, checkpoints):
        super().__init__()
        self.checkpoints = checkpoints

    def on_epoch_end(self, epoch, logs=None):
        if interrupted(self.model) or (self.model.stop_training and not _finite(logs)):
            return
        sync_state(self.model)
        self.checkpoints.save(epoch + 1)


class Interrupt(keras.callbacks.Callback):
    """Ctrl-C (SIGINT) stops the run after the current step, with a checkpoint of it.

    The checkpoint (`epoch-E-step-S.npz`) holds the state after step S of epoch E + 1,
    metric accumulators included, so `--resume` continues the epoch where it stopped and
    ends as the run would have. A second Ctrl-C stops at once (the last epoch's checkpoint
    stays). `saved` is the checkpoint's path once written.

    Args:
        checkpoints: the run's `checkpoints.Checkpoints`.
        first_step: steps of the first epoch already done (a resumed partial epoch).
    """

    def __init__(self, checkpoints, first_step=0):
        super().__init__()
        self.checkpoints = checkpoints
        self.first_step = first_step
        self.requested = False
        self.saved = None
        self._previous = None
        self._epoch = 0
        self._offset = first_step

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step (Ctrl-C again to stop at once)...", file=sys.stderr)

    def on_train_begin(self, logs=None):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def on_train_end(self, logs=None):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self._epoch:
            self._offset = 0
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not self.requested or self.saved is not None:
            return
        sync_state(self.model)
        step = self._offset + batch + 1
        self.saved = self.checkpoints.save(self._epoch, step)
        self.model.interrupted_at = (self._epoch, step)
        self.model.stop_training = True


class RestoreMetrics(keras.callbacks.Callback):
    """Puts back the metric accumulators of a checkpoint taken mid-epoch after fit has reset
    them at the start of that epoch (the resumed epoch then reports what it would have)."""

    def __init__(self, metrics, epoch):
        super().__init__()
        self.values = [(variable, keras.ops.convert_to_numpy(variable)) for variable in metrics]
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            for variable, value in self.values:
                variable.assign(value)


def metric_variables(model):
    """The variables of `model.metrics`, in order."""
    return [variable for metric in model.metrics for variable in metric.variables]


def _finite(logs):
    return all(
        math.isfinite(float(np.mean(value))) for key, value in (logs or {}).items() if "loss" in key
    )


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops at the first batch whose loss is NaN or infinite; `check()` then raises RunError.

    The epoch's checkpoint is skipped (see `EpochCheckpoint`), so the last good one stays.
    """

    def __init__(self):
        super().__init__()
        self.bad_batch = None

    def on_train_batch_end(self, batch, logs=None):
        if self.bad_batch is None and not _finite(logs):
            self.bad_batch = (self._epoch, batch, dict(logs))
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def check(self, checkpoint_dir):
        if self.bad_batch is not None:
            epoch, batch, logs = self.bad_batch
            saved = checkpoints.exists(pathlib.Path(checkpoint_dir).parent)
            kept = (
                f"the last good checkpoint in {checkpoint_dir} was kept"
                if saved
                else "no epoch had completed, so there is no checkpoint to resume from"
            )
            raise RunError(
                f"The loss became non-finite ({logs}) at epoch {epoch + 1}, batch {batch + 1}; "
                f"the run stopped and {kept} (try a lower learning rate, or mixed precision off)."
            )


def stored_config(model_dir, kind):
    """The `CONFIG` that `--resume` continues from in `model_dir` (a dict), for a run of
    `kind` ("search", "run"); UserInputError when there is none."""
    path = os.path.join(model_dir or "", CONFIG)
    if not model_dir or not os.path.isfile(path):
        raise UserInputError(
            f"--resume was given but --model_dir {model_dir!r} holds no {CONFIG} of a {kind}."
        )
    with open(path) as stream:
        return json.load(stream)
