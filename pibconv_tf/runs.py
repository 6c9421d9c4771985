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

import json
import math
import os
import pathlib
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from pibconv_tf.errors import RunError, UserInputError

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


class RunDir:
    """A prepared run directory.

    Attributes:
        path: the directory.
        resumed: whether the run continues a previous one (a checkpoint exists).
    """

    def __init__(self, path, resumed=False):
        self.path = pathlib.Path(path)
        self.resumed = resumed

    @classmethod
    def prepare(cls, path, resume=False, overwrite=False):
        """Validates `path` for a new or resumed run, creating or emptying it as asked."""
        if not path:
            raise UserInputError("--model_dir is required: where the run writes its outputs.")
        if resume and overwrite:
            raise UserInputError("--resume and --overwrite contradict each other; pass one.")
        path = pathlib.Path(path)
        if path.exists() and not path.is_dir():
            raise UserInputError(f"--model_dir {str(path)!r} exists and is not a directory.")
        non_empty = path.is_dir() and any(path.iterdir())
        if resume:
            if not latest_checkpoint(path):
                raise UserInputError(
                    f"--resume was given but {str(path)!r} holds no checkpoint to resume from."
                )
            return cls(path, resumed=True)
        if non_empty and not overwrite:
            raise UserInputError(
                f"--model_dir {str(path)!r} is not empty; pass --resume to continue that run "
                "or --overwrite to replace it."
            )
        if non_empty:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

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

    def checkpoint_manager(self, max_to_keep=2, **trackables):
        """A tf.train.CheckpointManager over `trackables` (models, optimizers, variables).

        Keras models and optimizers are checkpointed as `checkpoint_variables` of them:
        every variable they hold, trainable or not, by path (TensorFlow's object graph of a
        Keras 3 model misses the variables of layers held in lists, such as the BatchNorm
        statistics inside a cell's operations).
        """
        checkpoint = tf.train.Checkpoint(
            **{name: checkpoint_variables(value) for name, value in trackables.items()}
        )
        return tf.train.CheckpointManager(
            checkpoint, str(self.file(CHECKPOINT_DIR)), max_to_keep=max_to_keep
        )


def checkpoint_variables(value):
    """{path: tf.Variable} of every variable of a Keras model, layer or optimizer; any other
    value (a tf.Variable) as it is."""
    if not isinstance(value, (keras.layers.Layer, keras.optimizers.Optimizer)):
        return value
    variables = list(value.variables)
    paths = [variable.path for variable in variables]
    if len(set(paths)) != len(paths):
        repeated = sorted({path for path in paths if paths.count(path) > 1})
        raise ValueError(f"{value.name!r} holds several variables at the paths {repeated}.")
    return {path: getattr(v, "value", v) for path, v in zip(paths, variables, strict=True)}


def latest_checkpoint(path):
    return tf.train.latest_checkpoint(str(pathlib.Path(path) / CHECKPOINT_DIR))


def write_text_atomic(path, text):
    """Writes `text` to `path` through a temporary file, so a crash never leaves half a file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
    os.replace(tmp, path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path, data):
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _python(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


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
        record = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._start, 3)}
        record.update({key: _python(value) for key, value in (logs or {}).items()})
        if self.extra is not None:
            record.update({key: _python(value) for key, value in self.extra(epoch).items()})
        self.run_dir.append_jsonl(self.name, record)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves `manager`'s checkpoint after each epoch, with `epoch_variable` set to epochs done.

    Args:
        manager: a `tf.train.CheckpointManager` whose checkpoint tracks `epoch_variable`.
        epoch_variable: an integer variable holding the number of completed epochs.
    """

    def __init__(self, manager, epoch_variable):
        super().__init__()
        self.manager = manager
        self.epoch_variable = epoch_variable

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training and not _finite(logs):
            return
        self.epoch_variable.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


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
            saved = (pathlib.Path(checkpoint_dir) / "checkpoint").is_file()
            kept = (
                f"the last good checkpoint in {checkpoint_dir} was kept"
                if saved
                else "no epoch had completed, so there is no checkpoint to resume from"
            )
            raise RunError(
                f"The loss became non-finite ({logs}) at epoch {epoch + 1}, batch {batch + 1}; "
                f"the run stopped and {kept} (try a lower learning rate, or mixed precision off)."
            )
