"""Evaluation training: a derived network trained from scratch with the DARTS recipe.

The recipe (DARTS' `train.py`, which the PIBConv paper keeps): 600 epochs, batch 96, SGD
with momentum 0.9, coupled weight decay 3e-4, learning rate 0.025 annealed to 0 by a cosine
stepped once per epoch, gradient norm clipped at 5, cutout 16, drop path ramped linearly
from 0 to 0.2 over the epochs (p * epoch / epochs at the start of each epoch), and the
auxiliary tower's loss added with weight 0.4.

Example:
```python
config = TrainConfig(genotype="PIBCONV", dataset="digits", layers=2, init_channels=16,
                     epochs=30, model_dir="runs/digits")
summary = train(config)  # writes model.keras, metrics.jsonl, checkpoints/, ...
```

Reference:
    Liu et al., DARTS, arXiv 1806.09055 (Sec. 3.3); Ahmadian et al., arXiv 2301.01286
    (Sec. 3, Experimental Setup).
"""

import contextlib
import dataclasses
import json
import os
import time

import keras
import tensorflow as tf
from keras import ops
from tensorflow.core.framework import summary_pb2

from pibconv_tf import callbacks as callbacks_lib
from pibconv_tf import cells, data, distribute, genotypes, networks, optim
from pibconv_tf.errors import UserInputError
from pibconv_tf.rundir import CHECKPOINT_DIR, CONFIG, RunDir

MODEL = "model.keras"
BEST_MODEL = "model_best.keras"
BEST = "best.json"
RESULT = "result.json"
GENOTYPE = "genotype.json"
DATASET = "dataset.json"
TENSORBOARD = "tensorboard"
MIXED_PRECISION = (None, "mixed_float16", "mixed_bfloat16")
# What defines a run: a resumed run must keep them (epochs, evaluation and devices may change).
FIXED_ON_RESUME = (
    "dataset",
    "image_size",
    "seed",
    "init_channels",
    "layers",
    "batch_size",
    "mixed_precision",
)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; written as `config.json` next to its outputs.

    Args:
        genotype: a named genotype (`PIBCONV`, `DARTS_V2`) or the path of a genotype.json.
        dataset, data_dir, image_size, seed: the data (see `data.load_source`); `seed` also
            fixes the initialisation, augmentation and drop path draws.
        init_channels, layers: C and the number of cells of `networks.network_cifar`.
        epochs, batch_size: the schedule's length and the global batch size.
        learning_rate, min_learning_rate: the cosine's start and end.
        momentum, weight_decay, grad_clip: `optim.TorchSGD` (grad_clip 0 disables clipping).
        cutout_length: cutout square side (0 disables it).
        drop_path_prob: the final drop path rate of the linear ramp.
        auxiliary_weight: weight of the auxiliary tower's loss; 0 builds no auxiliary head.
        eval_every: evaluate on the test split every this many epochs (and after the last).
        steps_per_epoch: 0 for whole epochs, else at most this many steps (quick runs).
        strategy, mixed_precision, jit_compile: devices and numerics.
        model_dir, resume, overwrite: the run directory (see `rundir.RunDir.prepare`).
        verbose: 0 silent, 1 Keras' progress bar and one line per epoch, 2 the line only.
    """

    genotype: str = "PIBCONV"
    dataset: str = "cifar10"
    data_dir: str | None = None
    image_size: int = 32
    seed: int = 0
    init_channels: int = 36
    layers: int = 20
    epochs: int = 600
    batch_size: int = 96
    learning_rate: float = 0.025
    min_learning_rate: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    cutout_length: int = 16
    drop_path_prob: float = 0.2
    auxiliary_weight: float = 0.4
    eval_every: int = 1
    steps_per_epoch: int = 0
    strategy: str = "auto"
    mixed_precision: str | None = None
    jit_compile: bool = False
    model_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    verbose: int = 1

    def validate(self):
        """Raises UserInputError naming the first out-of-range field."""
        _at_least(self, "init_channels", 2)
        if self.init_channels % 2:
            # FactorizedReduce splits the channels of a reduction's input in two halves.
            raise UserInputError(
                f"--init_channels must be an even number >= 2, got {self.init_channels}."
            )
        _at_least(self, "layers", 1)
        _at_least(self, "epochs", 1)
        _at_least(self, "batch_size", 1)
        _at_least(self, "eval_every", 1)
        _at_least(self, "steps_per_epoch", 0)
        _at_least(self, "cutout_length", 0)
        if not self.learning_rate > 0:
            raise UserInputError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise UserInputError(
                f"--min_learning_rate must be from 0 to --learning_rate "
                f"({self.learning_rate}), got {self.min_learning_rate}."
            )
        if not 0 <= self.momentum < 1:
            raise UserInputError(f"--momentum must be in [0, 1), got {self.momentum}.")
        for name in ("weight_decay", "grad_clip", "auxiliary_weight"):
            if not getattr(self, name) >= 0:
                raise UserInputError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.drop_path_prob < 1:
            raise UserInputError(f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserInputError(
                f"--mixed_precision {self.mixed_precision!r} is unknown; expected "
                "mixed_float16 or mixed_bfloat16 (or none)."
            )
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserInputError(f"Training config has unknown fields {unknown}.")
        return cls(**values)


def _at_least(config, name, minimum):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"--{name} must be an integer >= {minimum}, got {value!r}.")


def resumed_config(model_dir, overrides):
    """The config stored in `model_dir`, updated with `overrides` (the flags given again).

    `--resume --model_dir=X` alone continues the run as it was started; a field of
    `FIXED_ON_RESUME` given with another value is refused by `train`.
    """
    path = os.path.join(model_dir or "", CONFIG)
    if not model_dir or not os.path.isfile(path):
        raise UserInputError(
            f"--resume was given but --model_dir {model_dir!r} holds no {CONFIG} of a run."
        )
    with open(path) as stream:
        stored = json.load(stream)
    return TrainConfig.from_dict({**stored, **overrides, "resume": True, "overwrite": False})


@keras.saving.register_keras_serializable(package="pibconv_tf")
class AuxiliaryTrainer(keras.Model):
    """Trains a `network_cifar` model on CE(logits) + auxiliary_weight * CE(aux_logits).

    Training reports the total loss and top-1 accuracy; evaluation (on the logits alone,
    as DARTS' `infer`) reports the cross-entropy, top-1 and top-5 accuracy. Logits are cast
    to float32 before the loss, so mixed precision keeps a float32 loss; the loss is scaled
    for `LossScaleOptimizer` and divided by the replicas, whose gradients are summed.

    Args:
        network: a `networks.network_cifar` model, with or without the auxiliary head.
        auxiliary_weight: the auxiliary loss weight (0.4 in DARTS), ignored without a head.

    Call arguments:
        images: normalised [N, H, W, 3] images.
        training: whether BatchNorm uses batch statistics and drop path is active.

    Example:
    >>> trainer = AuxiliaryTrainer(network_cifar(PIBCONV, layers=2, auxiliary=True), 0.4)
    >>> trainer.compile(optimizer=TorchSGD(0.025, coupled_weight_decay=3e-4))
    >>> trainer.fit(dataset, epochs=1)

    Reference:
        Liu et al., DARTS, arXiv 1806.09055 (train.py: loss += auxiliary_weight * loss_aux).
    """

    def __init__(self, network, auxiliary_weight=0.4, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.auxiliary_weight = auxiliary_weight
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        logits = network.output[networks.LOGITS] if _has_aux(network) else network.output
        num_classes = logits.shape[-1]
        self.top5 = keras.metrics.SparseTopKCategoricalAccuracy(
            k=min(5, num_classes), name="top5_accuracy"
        )

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy, self.top5]

    def call(self, images, training=None):
        return self.network(images, training=training)

    def losses_of(self, labels, outputs):
        """(total loss, logits): the batch-mean CE plus the weighted auxiliary CE."""
        if isinstance(outputs, dict):
            logits = ops.cast(outputs[networks.LOGITS], "float32")
            aux_logits = ops.cast(outputs[networks.AUX_LOGITS], "float32")
        else:
            logits, aux_logits = ops.cast(outputs, "float32"), None
        loss = _cross_entropy(labels, logits)
        if aux_logits is not None and self.auxiliary_weight:
            loss = loss + self.auxiliary_weight * _cross_entropy(labels, aux_logits)
        return loss, logits

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            loss, logits = self.losses_of(labels, self.network(images, training=True))
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss / replicas)
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        self.loss_tracker.update_state(loss, sample_weight=ops.shape(labels)[0])
        self.accuracy.update_state(labels, logits)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy.result()}

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        outputs = self.network(images, training=False)
        logits = outputs[networks.LOGITS] if isinstance(outputs, dict) else outputs
        logits = ops.cast(logits, "float32")
        loss = _cross_entropy(labels, logits)
        self.loss_tracker.update_state(loss, sample_weight=ops.shape(labels)[0])
        self.accuracy.update_state(labels, logits)
        self.top5.update_state(labels, logits)
        return {metric.name: metric.result() for metric in self.metrics}

    def get_config(self):
        return {
            **super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "auxiliary_weight": self.auxiliary_weight,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)


def _has_aux(network):
    return isinstance(network.output, dict)


def _cross_entropy(labels, logits):
    return ops.mean(ops.sparse_categorical_crossentropy(labels, logits, from_logits=True))


@contextlib.contextmanager
def dtype_policy(name):
    """Sets Keras' global dtype policy (e.g. "mixed_float16") for the block."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name or "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def make_optimizer(config):
    """`optim.TorchSGD` with the config's hyper-parameters; float16 gets loss scaling.

    The learning rate is a variable that `EpochSchedule` sets at each epoch's start from
    `lr_schedule(config)` (DARTS steps its cosine per epoch), so the schedule depends on the
    epoch alone, not on step counts (which loss scaling's skipped steps would shift).
    """
    optimizer = optim.TorchSGD(
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        coupled_weight_decay=config.weight_decay,
        global_clipnorm=config.grad_clip or None,
    )
    if config.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def lr_schedule(config):
    return optim.EpochCosineDecay(
        config.learning_rate, config.epochs, steps_per_epoch=1, minimum=config.min_learning_rate
    )


def drop_path_rate(config, epoch):
    """DARTS' linear ramp: drop_path_prob * epoch / epochs, for the 0-based `epoch`."""
    return config.drop_path_prob * epoch / config.epochs


def build_trainer(config, genotype, num_classes, image_size):
    """The network (with the auxiliary head when its weight is > 0), its trainer and
    optimizer, compiled and built; call inside the strategy scope and dtype policy."""
    network = networks.network_cifar(
        genotype,
        num_classes=num_classes,
        init_channels=config.init_channels,
        layers=config.layers,
        auxiliary=config.auxiliary_weight > 0,
        image_size=image_size,
        seed=config.seed,
    )
    trainer = AuxiliaryTrainer(network, config.auxiliary_weight)
    optimizer = make_optimizer(config)
    trainer.compile(optimizer=optimizer, jit_compile=config.jit_compile)
    # Built now so that a checkpoint restores the momentum buffers instead of deferring.
    optimizer.build(network.trainable_variables)
    return network, trainer, optimizer


class EpochSchedule(keras.callbacks.Callback):
    """Sets the epoch's learning rate and drop path rate at its start and logs both.

    Args:
        network: the model whose cells get `cells.set_drop_path_rate`.
        config: the `TrainConfig` (cosine and drop path ramp).
    """

    def __init__(self, network, config):
        super().__init__()
        self.network = network
        self.config = config
        self.schedule = lr_schedule(config)
        self.values = {}

    def on_epoch_begin(self, epoch, logs=None):
        learning_rate = float(self.schedule.at_epoch(epoch))
        rate = drop_path_rate(self.config, epoch)
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
        self._times = [time.perf_counter()]

    def on_train_batch_end(self, batch, logs=None):
        if len(self._times) < 2:
            self._times.append(time.perf_counter())
        self._batches = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        now = time.perf_counter()
        start, first = self._times[0], self._times[-1]
        timed = self._batches - 1 if self._batches > 1 and now > first else self._batches
        seconds = now - (first if timed < self._batches else start)
        logs["train_seconds"] = round(now - start, 3)
        logs["images_per_second"] = round(timed * self.batch_size / max(seconds, 1e-9), 2)
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
            self.export.save(self.run_dir.file(BEST_MODEL))
            self.best = {"epoch": epoch + 1, "test_accuracy": accuracy}
            self.run_dir.write_json(BEST, self.best)


class ScalarSummaries(keras.callbacks.Callback):
    """Writes every numeric epoch log as a TensorBoard scalar (`train/loss`, `test/accuracy`).

    Uses `tf.summary.write` with the scalars plugin's metadata, which TensorFlow provides
    without the `tensorboard` package (that `keras.callbacks.TensorBoard` needs).

    Args:
        log_dir: the event file directory.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir))
        self.metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default():
            for key, value in (logs or {}).items():
                if isinstance(value, int | float):
                    group, name = ("test", key[5:]) if key.startswith("test_") else ("train", key)
                    tensor = tf.constant(float(value))
                    tf.summary.write(f"{group}/{name}", tensor, epoch + 1, self.metadata)
        self.writer.flush()


class ProgressLine(keras.callbacks.Callback):
    """Prints one line per epoch: losses, accuracies, lr, drop path and images per second."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
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


def train(config, extra_callbacks=()):
    """Trains `config.genotype` from scratch (or resumes) and writes the run directory.

    Outputs in `config.model_dir`: `config.json`, `genotype.json`, `dataset.json` (class
    names, mean and std for export), `metrics.jsonl` (one line per epoch), `tensorboard/`,
    `checkpoints/` (per epoch), `model.keras` (the final logits-only float32 model),
    `model_best.keras` with `best.json` (the epoch of best test top-1), `result.json`.

    Args:
        config: a `TrainConfig`.
        extra_callbacks: Keras callbacks run after the built-in ones (after the epoch's
            checkpoint is saved).

    Returns:
        The `result.json` summary: epochs, final test metrics, best test accuracy and epoch.

    Raises:
        UserInputError: bad config, genotype or data, or an unusable `model_dir`, before
            any file is written.
        RunError: the loss became non-finite (the last good checkpoint is kept).
    """
    genotype, source = check_inputs(config)
    run_dir = RunDir.prepare(config.model_dir, config.resume, config.overwrite)
    if run_dir.resumed:
        genotype = _check_resume(run_dir, config, genotype)
    run_dir.write_json(CONFIG, config.to_dict())
    run_dir.write_json(GENOTYPE, genotype.to_dict())
    run_dir.write_json(DATASET, source.info.to_json_dict())
    keras.utils.set_random_seed(config.seed)
    strategy = distribute.get_strategy(config.strategy)
    with dtype_policy(config.mixed_precision):
        with strategy.scope():
            network, trainer, optimizer = build_trainer(
                config, genotype, source.info.num_classes, source.info.image_size
            )
            epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        manager = run_dir.checkpoint_manager(network=network, optimizer=optimizer, epoch=epoch)
        start = _restore(manager, epoch, run_dir)
        export = ModelExport(network, lambda: _inference_network(config, genotype, source.info))
        stopper = callbacks_lib.StopOnNonFinite()
        callbacks = [
            EpochSchedule(network, config),
            TestEvaluation(
                data.eval_pipeline(source, config.batch_size),
                config.eval_every,
                config.epochs,
                config.batch_size,
            ),
            BestModelSaver(export, run_dir, _read_json(run_dir, BEST)),
            callbacks_lib.EpochLogger(run_dir),
            ScalarSummaries(run_dir.file(TENSORBOARD)),
            callbacks_lib.EpochCheckpoint(manager, epoch),
            stopper,
            *extra_callbacks,
        ]
        if config.verbose:
            callbacks.insert(3, ProgressLine(config.epochs))
        if start < config.epochs:
            trainer.fit(
                _train_data(source, config, start),
                epochs=config.epochs,
                initial_epoch=start,
                callbacks=callbacks,
                shuffle=False,  # the pipeline shuffles
                verbose=1 if config.verbose == 1 else 0,
            )
        stopper.check(run_dir.file(CHECKPOINT_DIR))
        export.save(run_dir.file(MODEL))
    result = _result(run_dir)
    run_dir.write_json(RESULT, result)
    return result


def check_inputs(config):
    """Validates the config, genotype and data before any file is touched.

    Returns:
        (genotype, source).
    """
    config.validate()
    genotype = genotypes.load_genotype(config.genotype)
    source = data.load_source(config.dataset, config.data_dir, config.image_size, config.seed)
    _train_data(source, config, 0)  # batch size and cutout against the data
    return genotype, source


def _train_data(source, config, start_epoch):
    # A resumed run reseeds by its start epoch, so it does not replay epoch 1's order.
    dataset = data.train_pipeline(
        source,
        config.batch_size,
        cutout_length=config.cutout_length,
        seed=config.seed + 1000 * start_epoch,
    )
    return dataset.take(config.steps_per_epoch) if config.steps_per_epoch else dataset


def _inference_network(config, genotype, info):
    return networks.network_cifar(
        genotype,
        num_classes=info.num_classes,
        init_channels=config.init_channels,
        layers=config.layers,
        auxiliary=False,
        image_size=info.image_size,
        seed=config.seed,
    )


def _check_resume(run_dir, config, genotype):
    """The run's own genotype; refuses a change to what defines the run."""
    stored = run_dir.read_json(CONFIG)
    for name in FIXED_ON_RESUME:
        if stored.get(name) != getattr(config, name):
            raise UserInputError(
                f"--{name}={getattr(config, name)!r} differs from the run being resumed in "
                f"{str(run_dir.path)!r} ({stored.get(name)!r}); resume with the same value."
            )
    if (stored.get("auxiliary_weight", 0) > 0) != (config.auxiliary_weight > 0):
        raise UserInputError(
            "--auxiliary_weight cannot switch the auxiliary head on or off when resuming "
            f"(the run in {str(run_dir.path)!r} used {stored.get('auxiliary_weight')!r})."
        )
    own = genotypes.Genotype.from_dict(run_dir.read_json(GENOTYPE))
    if own != genotype:
        raise UserInputError(
            f"--genotype {config.genotype!r} differs from the genotype of the run being "
            f"resumed in {str(run_dir.path)!r}; resume without --genotype or with the same one."
        )
    return own


def _restore(manager, epoch, run_dir):
    """Restores the latest checkpoint (if any) and drops log lines of later epochs."""
    if manager.latest_checkpoint is None:
        return 0
    manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    start = int(epoch.numpy())
    run_dir.truncate_jsonl(callbacks_lib.METRICS, lambda record: record["epoch"] <= start)
    return start


def _read_json(run_dir, name):
    path = run_dir.file(name)
    return json.loads(path.read_text()) if path.exists() else None


def _result(run_dir):
    records = run_dir.read_jsonl(callbacks_lib.METRICS)
    last = records[-1] if records else {}
    best = _read_json(run_dir, BEST) or {}
    result = {"epochs": last.get("epoch", 0), "model": str(run_dir.file(MODEL))}
    for name in ("test_loss", "test_accuracy", "test_top5_accuracy", "loss", "accuracy"):
        if name in last:
            result[name] = last[name]
    if best:
        result.update(
            best_epoch=best["epoch"],
            best_test_accuracy=best["test_accuracy"],
            best_model=str(run_dir.file(BEST_MODEL)),
        )
    return result
