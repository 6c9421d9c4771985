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
import numpy as np
from absl import logging

from pibconv_tf import checkpoints, data, distribute, runs
from pibconv_tf.errors import Interrupted, UserInputError
from pibconv_tf.model import genotypes, networks, saving
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

    A resumed run continues from its newest intact checkpoint and ends with the weights and
    metrics of the run had it not stopped: each epoch's data order and augmentation depend
    on (seed, epoch) alone, and the drop-path generators, BatchNorm statistics, optimizer
    and (mid-epoch) metric accumulators are in the checkpoint. Resuming a finished run
    changes nothing. Ctrl-C stops after the current step with a checkpoint of it
    (`runs.Interrupted` is raised, naming the command that continues).

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
    # First: a multi-worker strategy must exist before TensorFlow runs an operation.
    strategy = distribute.get_strategy(config.strategy)
    genotype, source = check_inputs(config)
    run_dir = RunDir.prepare(
        config.model_dir, config.resume, config.overwrite, chief=distribute.is_chief(strategy)
    )
    try:
        if run_dir.resumed:
            genotype = _check_resume(run_dir, config, genotype)
            finished = _finished(run_dir, config)
            if finished is not None:
                print(
                    f"The run in {str(run_dir.path)!r} is complete ({finished['epochs']} of "
                    f"{config.epochs} epochs); nothing to do.",
                    flush=True,
                )
                return finished
        return _train(config, run_dir, strategy, genotype, source, extra_callbacks)
    finally:
        run_dir.release()


def _train(config, run_dir, strategy, genotype, source, extra_callbacks):
    keras.utils.set_random_seed(config.seed)
    with dtype_policy(config.mixed_precision):
        with strategy.scope():
            network, trainer, optimizer = build_trainer(
                config, genotype, source.info.num_classes, source.info.image_size
            )
        metrics = runs.metric_variables(trainer)
        saved = run_dir.checkpoints(network=network, optimizer=optimizer, metrics=metrics)
        start, step = _restore(saved, run_dir) if run_dir.resumed else (0, 0)
        # Written once the checkpoint (if any) restored: a failed resume leaves the run as it was.
        run_dir.write_json(runs.CONFIG, config.to_dict())
        run_dir.write_json(runs.GENOTYPE, genotype.to_dict())
        run_dir.write_json(runs.DATASET, source.info.to_json_dict())
        export = ModelExport(network, lambda: _inference_network(config, genotype, source.info))
        stopper = runs.StopOnNonFinite()
        interrupt = runs.Interrupt(saved, first_step=step)
        callbacks = [
            runs.FirstStep("training step", bool(config.verbose)),
            runs.SyncState(),
            interrupt,
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
            *([ProgressLine(config.epochs)] if config.verbose else []),
            runs.EpochLogger(run_dir),
            ScalarSummaries(run_dir.file(runs.TENSORBOARD)),
            runs.EpochCheckpoint(saved),
            stopper,
            *extra_callbacks,
        ]
        steps = steps_per_epoch(source, config)
        fit = dict(shuffle=False, verbose=1 if config.verbose == 1 else 0)  # the data shuffles
        if step and start < config.epochs:  # the rest of an interrupted epoch first
            trainer.fit(
                _train_data(source, config, start, start + 1, skip=step),
                epochs=start + 1,
                initial_epoch=start,
                steps_per_epoch=steps - step,
                callbacks=[*callbacks, runs.RestoreMetrics(metrics, start)],
                **fit,
            )
            start += 1
        if start < config.epochs and not _stopped(trainer, stopper):
            trainer.fit(
                _train_data(source, config, start, config.epochs),
                epochs=config.epochs,
                initial_epoch=start,
                steps_per_epoch=steps,
                callbacks=callbacks,
                **fit,
            )
        if interrupt.saved:
            epoch, done = trainer.interrupted_at
            raise Interrupted(
                f"Stopped after step {done} of epoch {epoch + 1}; saved {interrupt.saved}."
            )
        stopper.check(run_dir.file(runs.CHECKPOINT_DIR))
        export.save(run_dir.file(runs.MODEL))
        _check_export(run_dir, source, config)
    result = _result(run_dir)
    run_dir.write_json(runs.RESULT, result)
    return result


def _stopped(trainer, stopper):
    return runs.interrupted(trainer) or stopper.bad_batch is not None


def check_inputs(config):
    """Validates the config, genotype and data before any file is touched.

    Returns:
        (genotype, source).
    """
    config.validate()
    genotype = genotypes.load_genotype(config.genotype)
    source = data.load_source(config.dataset, config.data_dir, config.image_size, config.seed)
    _train_data(source, config, 0, 1)  # batch size and cutout against the data
    return genotype, source


def steps_per_epoch(source, config):
    """Training steps per epoch: the whole train split, or `config.steps_per_epoch`."""
    steps = data.train_steps_per_epoch(source, config.batch_size)
    return min(steps, config.steps_per_epoch) if config.steps_per_epoch else steps


def _train_data(source, config, first_epoch, epochs, skip=0):
    """Epochs `first_epoch`..`epochs - 1` (each a function of the seed and the epoch)."""
    return data.train_epochs(
        source,
        config.batch_size,
        first_epoch,
        epochs,
        skip=skip,
        steps_per_epoch=config.steps_per_epoch,
        seed=config.seed,
        cutout_length=config.cutout_length,
        randaugment=config.randaugment,
    )


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


def _restore(saved, run_dir):
    """Restores the newest intact checkpoint; drops log lines of the epochs after it.

    Returns:
        (epochs done, steps done of the next epoch).
    """
    entry = saved.restore()
    if entry is None:
        return 0, 0
    start, step = entry["epoch"], entry["step"]
    run_dir.truncate_jsonl(runs.METRICS, lambda record: record["epoch"] <= start)
    at = f"step {step} of epoch {start + 1}" if step else f"epoch {start}"
    print(f"Resuming from {entry['path']} (after {at}).", flush=True)
    return start, step


def _finished(run_dir, config):
    """The stored result of a run that has trained `config.epochs` epochs, else None."""
    entries = checkpoints.Checkpoints(run_dir.path).entries()
    result = _read_json(run_dir, runs.RESULT)
    newest = entries[0] if entries else None
    if result is None or newest is None or newest["step"] or newest["epoch"] < config.epochs:
        return None
    if result.get("epochs", 0) < config.epochs or not run_dir.file(runs.MODEL).exists():
        return None
    return result


def _check_export(run_dir, source, config):
    """Warns when the saved model.keras, loaded back, does not evaluate as the last epoch's
    test did (the same network: only a broken save or restore would make them differ)."""
    records = run_dir.read_jsonl(runs.METRICS)
    recorded = records[-1].get("test_accuracy") if records else None
    if recorded is None:
        return
    model = saving.load_model(str(run_dir.file(runs.MODEL)))
    logits = model.predict(data.eval_pipeline(source, config.batch_size), verbose=0)
    labels = source.numpy("test")[1]
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels))
    if abs(accuracy - recorded) > 0.5 / max(len(labels), 1) + 1e-6:
        logging.warning(
            "%s evaluates to test top-1 %.4f, but the last epoch recorded %.4f.",
            run_dir.file(runs.MODEL),
            accuracy,
            recorded,
        )


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
