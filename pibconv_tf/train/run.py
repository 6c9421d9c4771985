"""Evaluation training: a derived network trained from scratch with the DARTS recipe.

`train(TrainConfig(...))` builds the network and its trainer (`train.trainer`), feeds the
augmented data, and writes the run directory (files named in `pibconv_tf.runs`); see
`train.config` for the recipe.

Example:
```python
config = TrainConfig(genotype="PIBCONV", dataset="digits", layers=2, init_channels=16,
                     epochs=30, model_dir="runs/digits")
summary = train(config)  # writes model.keras, metrics.jsonl, checkpoints/, ...
```
"""

import json

import keras
import tensorflow as tf

from pibconv_tf import data, distribute, runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import genotypes, networks
from pibconv_tf.runs import RunDir
from pibconv_tf.train.callbacks import (
    BestModelSaver,
    EpochSchedule,
    ModelExport,
    ProgressLine,
    ScalarSummaries,
    TestEvaluation,
    dtype_policy,
)
from pibconv_tf.train.config import FIXED_ON_RESUME, TrainConfig
from pibconv_tf.train.trainer import build_trainer, drop_path_rate, lr_schedule

__all__ = ["TrainConfig", "check_inputs", "train"]


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
        run_dir.write_json(runs.CONFIG, config.to_dict())
        run_dir.write_json(runs.GENOTYPE, genotype.to_dict())
        run_dir.write_json(runs.DATASET, source.info.to_json_dict())
        export = ModelExport(network, lambda: _inference_network(config, genotype, source.info))
        stopper = runs.StopOnNonFinite()
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
            BestModelSaver(export, run_dir, _read_json(run_dir, runs.BEST)),
            runs.EpochLogger(run_dir),
            ScalarSummaries(run_dir.file(runs.TENSORBOARD)),
            runs.EpochCheckpoint(manager, epoch),
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
        stopper.check(run_dir.file(runs.CHECKPOINT_DIR))
        export.save(run_dir.file(runs.MODEL))
    result = _result(run_dir)
    run_dir.write_json(runs.RESULT, result)
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
        randaugment=config.randaugment,
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
    stored = run_dir.read_json(runs.CONFIG)
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
    own = genotypes.Genotype.from_dict(run_dir.read_json(runs.GENOTYPE))
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
    run_dir.truncate_jsonl(runs.METRICS, lambda record: record["epoch"] <= start)
    return start


def _read_json(run_dir, name):
    path = run_dir.file(name)
    return json.loads(path.read_text()) if path.exists() else None


def _result(run_dir):
    records = run_dir.read_jsonl(runs.METRICS)
    last = records[-1] if records else {}
    best = _read_json(run_dir, runs.BEST) or {}
    result = {"epochs": last.get("epoch", 0), "model": str(run_dir.file(runs.MODEL))}
    for name in ("test_loss", "test_accuracy", "test_top5_accuracy", "loss", "accuracy"):
        if name in last:
            result[name] = last[name]
    if best:
        result.update(
            best_epoch=best["epoch"],
            best_test_accuracy=best["test_accuracy"],
            best_model=str(run_dir.file(runs.BEST_MODEL)),
        )
    return result
