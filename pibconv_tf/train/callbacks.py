"""Callbacks and export used by `training.train`: schedules, test passes, logs, best model.

Each epoch `EpochSchedule` sets the learning rate and drop path rate, `TestEvaluation`
adds throughput and test metrics to the logs, `BestModelSaver` keeps the best model,
`ScalarSummaries` writes TensorBoard scalars and `ProgressLine` prints one line.
"""

import os
import time

import keras
import tensorflow as tf

from pibconv_tf import runs
from pibconv_tf.model import cells
from pibconv_tf.model.numerics import dtype_policy  # noqa: F401 (re-exported)


class EpochSchedule(keras.callbacks.Callback):
    """Sets the epoch's learning rate and drop path rate at its start and logs both.

    Args:
        network: the model whose cells get `cells.set_drop_path_rate`.
        learning_rate: callable (0-based epoch) -> learning rate.
        drop_path_rate: callable (0-based epoch) -> drop path rate.
    """

    def __init__(self, network, learning_rate, drop_path_rate):
        super().__init__()
        self.network = network
        self.learning_rate = learning_rate
        self.drop_path_rate = drop_path_rate
        self.values = {}

    def on_epoch_begin(self, epoch, logs=None):
        learning_rate = float(self.learning_rate(epoch))
        rate = float(self.drop_path_rate(epoch))
        self.model.optimizer.learning_rate = learning_rate
        cells.set_drop_path_rate(self.network, rate)
        self.values = {"learning_rate": learning_rate, "drop_path_prob": rate}

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.values)


class TestEvaluation(keras.callbacks.Callback):
    """Adds the epoch's training throughput and, every `every` epochs and after the last,
    the test split's `test_loss`, `test_accuracy` and `test_top5_accuracy` to the logs.

    Throughput counts the images of batches 2..n over the time from the end of batch 1
    to the end of the epoch, so tracing and compilation stay out of it.

    Args:
        dataset: the test batches.
        every: evaluation period in epochs.
        epochs: the last epoch (always evaluated).
        batch_size: global batch size, for images per second.
    """

    def __init__(self, dataset, every, epochs, batch_size):
        super().__init__()
        self.dataset = dataset
        self.every = every
        self.epochs = epochs
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._after_first, self._batches = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch, logs=None):
        if self._after_first is None:
            self._after_first = time.perf_counter()
        self._batches = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        now = time.perf_counter()
        if self._batches > 1:
            images, seconds = (self._batches - 1) * self.batch_size, now - self._after_first
        else:
            images, seconds = self._batches * self.batch_size, now - self._start
        logs["train_seconds"] = round(now - self._start, 3)
        logs["images_per_second"] = round(images / max(seconds, 1e-9), 2)
        due = (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs
        if due and not self.model.stop_training:
            results = self.model.evaluate(self.dataset, verbose=0, return_dict=True)
            logs.update({f"test_{name}": float(value) for name, value in results.items()})


class ModelExport:
    """Saves the logits-only, float32, drop-path-free copy of a trained network.

    The copy is built once (under the float32 policy, without the auxiliary head) and gets
    the trained weights by layer name before every save, so `model.keras` loads and runs
    without mixed precision or training-only parts. Saves are atomic.

    Args:
        network: the trained `network_cifar` model.
        build: callable () -> the float32 logits-only network to copy into.
    """

    def __init__(self, network, build):
        self.network = network
        self.build = build
        self._copy = None

    def model(self):
        if self._copy is None:
            with dtype_policy("float32"):
                self._copy = self.build()
        for layer in self._copy.layers:
            if layer.weights:
                layer.set_weights(self.network.get_layer(layer.name).get_weights())
        cells.set_drop_path_rate(self._copy, 0.0)
        return self._copy

    def save(self, path):
        path = str(path)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
        self.model().save(tmp)
        os.replace(tmp, path)


class BestModelSaver(keras.callbacks.Callback):
    """Saves `model_best.keras` whenever the test top-1 accuracy beats the best so far.

    Args:
        export: a `ModelExport`.
        run_dir: the `RunDir`; `best.json` records the best epoch and accuracy.
        best: the best accuracy of earlier epochs (of a resumed run).
    """

    def __init__(self, export, run_dir, best=None):
        super().__init__()
        self.export = export
        self.run_dir = run_dir
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        accuracy = (logs or {}).get("test_accuracy")
        if accuracy is None or self.model.stop_training:
            return
        if self.best is None or accuracy > self.best["test_accuracy"]:
            self.export.save(self.run_dir.file(runs.BEST_MODEL))
            self.best = {"epoch": epoch + 1, "test_accuracy": accuracy}
            self.run_dir.write_json(runs.BEST, self.best)


class ScalarSummaries(keras.callbacks.Callback):
    """Writes every numeric epoch log as a TensorBoard scalar (`train/loss`, `test/accuracy`).

    `tf.summary.scalar` (TensorBoard's, a pinned dependency).

    Args:
        log_dir: the event file directory.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir))

    def on_epoch_end(self, epoch, logs=None):
        if runs.interrupted(self.model):
            return
        with self.writer.as_default():
            for key, value in (logs or {}).items():
                if isinstance(value, int | float):
                    group, name = ("test", key[5:]) if key.startswith("test_") else ("train", key)
                    tf.summary.scalar(f"{group}/{name}", float(value), step=epoch + 1)
        self.writer.flush()


class ProgressLine(keras.callbacks.Callback):
    """Prints one line per epoch: losses, accuracies, lr, drop path and images per second."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if runs.interrupted(self.model):
            return
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}"]
        parts.append(f"loss {logs.get('loss', float('nan')):.4f}")
        parts.append(f"acc {100 * logs.get('accuracy', float('nan')):.2f}%")
        if "test_accuracy" in logs:
            parts.append(
                f"test loss {logs['test_loss']:.4f} top-1 {100 * logs['test_accuracy']:.2f}% "
                f"top-5 {100 * logs['test_top5_accuracy']:.2f}%"
            )
        parts.append(f"lr {logs.get('learning_rate', 0):.3e}")
        parts.append(f"drop path {logs.get('drop_path_prob', 0):.3f}")
        parts.append(f"{logs.get('images_per_second', 0):.1f} images/s")
        print(" | ".join(parts), flush=True)
