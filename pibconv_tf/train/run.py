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

import dataclasses
import json
import os

import keras
import tensorflow as tf
from keras import ops

from pibconv_tf import data, distribute, optim
from pibconv_tf import runs as callbacks_lib
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import genotypes, networks
from pibconv_tf.runs import CHECKPOINT_DIR, CONFIG, RunDir
from pibconv_tf.train.callbacks import (
    BEST,
    BEST_MODEL,
    BestModelSaver,
    EpochSchedule,
    ModelExport,
    ProgressLine,
    ScalarSummaries,
    TestEvaluation,
    dtype_policy,
)

MODEL = "model.keras"
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
    own = os.path.join(model_dir, GENOTYPE)
    if stored.get("genotype") not in genotypes.NAMED_GENOTYPES and os.path.isfile(own):
        stored["genotype"] = own  # the run's copy, in case the original file moved
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
        if replicas > 1:
            # Keras clips each replica's gradients before it sums them. Summing first and
            # passing the mean (clipped at grad_clip / replicas, see `make_optimizer`) clips
            # the global gradient at grad_clip, as one device would.
            context = tf.distribute.get_replica_context()
            gradients = [g / replicas for g in context.all_reduce("sum", gradients)]
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


def make_optimizer(config, replicas=1):
    """`optim.TorchSGD` with the config's hyper-parameters; float16 gets loss scaling.

    The learning rate is a variable that `EpochSchedule` sets at each epoch's start from
    `lr_schedule(config)` (DARTS steps its cosine per epoch), so the schedule depends on the
    epoch alone, not on step counts (which loss scaling's skipped steps would shift). With
    several replicas the clip norm is divided by their number: each replica then clips the
    all-reduced gradient divided by the replicas (see `AuxiliaryTrainer.train_step`).
    """
    optimizer = optim.TorchSGD(
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        coupled_weight_decay=config.weight_decay,
        global_clipnorm=config.grad_clip / replicas if config.grad_clip else None,
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
    optimizer = make_optimizer(config, tf.distribute.get_strategy().num_replicas_in_sync)
    trainer.compile(optimizer=optimizer, jit_compile=config.jit_compile)
    # Built now so that a checkpoint restores the momentum buffers instead of deferring.
    optimizer.build(network.trainable_variables)
    return network, trainer, optimizer


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
        # Written once the checkpoint (if any) restored: a failed resume leaves the run as it was.
        run_dir.write_json(CONFIG, config.to_dict())
        run_dir.write_json(GENOTYPE, genotype.to_dict())
        run_dir.write_json(DATASET, source.info.to_json_dict())
        export = ModelExport(network, lambda: _inference_network(config, genotype, source.info))
        stopper = callbacks_lib.StopOnNonFinite()
        callbacks = [
            EpochSchedule(
                network,
                lr_schedule(config).at_epoch,
                lambda epoch: drop_path_rate(config, epoch),
            ),
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
    try:
        manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:  # objects unmatched, or shapes that differ
        raise UserInputError(
            f"The checkpoint {manager.latest_checkpoint!r} does not match the network built "
            "for this run (a version of pibconv_tf with other layers wrote it); resume it "
            "with that version, or start a new run."
        ) from error
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
