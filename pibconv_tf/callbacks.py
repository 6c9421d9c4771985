"""Keras callbacks that make long runs trustworthy: epoch logs, checkpoints, divergence stop.

Search and evaluation training share them: each epoch appends one JSON line to
`metrics.jsonl`, saves a checkpoint of everything needed to resume (models, optimizers, the
epoch counter), and a non-finite loss stops the run before a bad checkpoint is written.
"""

import math
import pathlib
import time

import keras
import numpy as np

from pibconv_tf.errors import RunError

METRICS = "metrics.jsonl"


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
