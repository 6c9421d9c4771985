"""A complete, resumable DARTS search run: data, strategy, trainer, outputs.

`run_search(config)` writes into `config.model_dir`:
- `config.json`: the resolved configuration;
- `metrics.jsonl`: one line per epoch (train/val loss and accuracy, lr, seconds, ...);
- `genotypes.jsonl`: one line per epoch, {"epoch", "genotype"};
- `alphas.npz`: softmax(alpha) after every epoch, `normal` and `reduce` of shape
  [epochs, edges, ops], and `primitives`;
- `genotype.json`: the final genotype, once every epoch has run;
- `tensorboard/`: TensorBoard logs; `checkpoints/`: the last two epochs' checkpoints.

`resume=True` restores the last checkpoint (weights, alphas, both optimisers, BatchNorm
statistics, epoch), truncates the per-epoch records to it and continues with the data
stream at the start of the next epoch, so the files end as those of an uninterrupted run.
"""

import dataclasses
import os

import keras
import numpy as np
from absl import logging

from pibconv_tf import data, distribute, files, optim, runs
from pibconv_tf.errors import Interrupted, UserInputError
from pibconv_tf.model import genotypes, numerics
from pibconv_tf.model.genotypes import Genotype
from pibconv_tf.model.search_network import SearchNetwork, build_network
from pibconv_tf.optim import TorchAdam
from pibconv_tf.search import regularization
from pibconv_tf.search.config import SearchConfig
from pibconv_tf.search.trainer import SearchTrainer


class ArchitectureLogger(keras.callbacks.Callback):
    """After each epoch, appends the derived genotype to `genotypes.jsonl` and softmax(alpha)
    to `alphas.npz` (rewritten atomically). Epochs whose alphas are not finite are skipped.

    Args:
        run_dir: a `runs.RunDir`.
        network: the `SearchNetwork`.
        history: {"normal": [...], "reduce": [...]} of earlier epochs (when resuming).
    """

    def __init__(self, run_dir, network, history=None, max_skip=None, early_stop=False):
        super().__init__()
        self.run_dir = run_dir
        self.network = network
        self.history = history or {kind: [] for kind in network.arch_weights()}
        self.max_skip = max_skip
        self.early_stop = early_stop
        self.stopped_early = None  # the epoch DARTS+' criterion stopped the search after

    def on_epoch_end(self, epoch, logs=None):
        if runs.interrupted(self.model):
            return
        runs.sync_state(self.model)
        weights = self.network.arch_weights()
        if not all(np.isfinite(w).all() for w in weights.values()):
            return
        genotype = self.network.genotype(self.max_skip)
        record = {"epoch": epoch + 1, "genotype": genotype.to_dict()}
        # DARTS+' criterion on DARTS' own derivation (before any --max_skip).
        skips = genotypes.skip_count(self.network.genotype().normal)
        if self.early_stop and skips >= EARLY_STOP_SKIPS:
            self.stopped_early = epoch + 1
            record["stopped_early"] = True
            self.model.stop_training = True
            print(
                f"Early stop after epoch {epoch + 1}: the normal cell has {skips} skip "
                "connections (DARTS+' criterion); the genotype is derived here.",
                flush=True,
            )
        self.run_dir.append_jsonl(runs.GENOTYPES, record)
        for kind, value in weights.items():
            self.history[kind].append(value)
        write_alphas(self.run_dir.file(runs.ALPHAS), self.history, self.network.primitives)
        logging.info("Epoch %d genotype: %s", epoch + 1, genotype)


# DARTS+' early stop: two or more skip connections in the derived normal cell.
EARLY_STOP_SKIPS = 2


def write_alphas(path, history, primitives):
    """Saves the softmax(alpha) history atomically (a crash never leaves half a file); with
    partial channels also the edge weights (`normal_edges`, `reduce_edges`)."""
    arrays = {kind: np.asarray(values, np.float32) for kind, values in history.items()}
    with files.atomic_file(path, "wb") as stream:
        np.savez(stream, **arrays, primitives=np.asarray(primitives))


def read_alphas(path):
    """The history in `alphas.npz`: {"normal", "reduce"} (and with partial channels
    "normal_edges", "reduce_edges") lists of arrays, and "primitives"."""
    with np.load(path) as arrays:
        history = {kind: list(arrays[kind]) for kind in arrays.files if kind != "primitives"}
        return {**history, "primitives": tuple(str(p) for p in arrays["primitives"])}


def _build(config, num_classes, strategy):
    """Network, compiled trainer and the learning-rate schedule, in the strategy's scope."""
    with strategy.scope(), numerics.synchronized_batch_norm(config.sync_batch_norm):
        network = SearchNetwork(
            num_classes,
            config.init_channels,
            config.layers,
            config.nodes,
            config.nodes,
            config.search_space,
            seed=config.seed,
            partial_channels=config.partial_channels,
        )
        build_network(network, config.image_size)
        trainer = SearchTrainer(
            network,
            order="second" if config.unrolled else "first",
            grad_clip=config.grad_clip,
            hessian=config.hessian,
            # A shared trace is a nested tf.function, which cannot hold the cross-replica
            # sum of synchronized BatchNorm: edges are then traced one by one (slower).
            share_traces=not config.sync_batch_norm,
            inline_traces=bool(config.inline_traces),
            # None: on wherever offered (TensorFlow's shared traces).
            recompute=config.recompute,
            # Set per epoch by `regularization.BetaDecaySchedule`.
            beta_regularization=0.0 if config.beta_regularization else None,
        )
        # Stepped per epoch by `optim.EpochLearningRate` (not by the optimizer's step count,
        # which float16's skipped steps would hold back).
        schedule = optim.EpochCosineDecay(
            config.learning_rate, config.epochs, 1, config.learning_rate_min
        )
        weight_optimizer = optim.TorchSGD(
            config.learning_rate, config.momentum, coupled_weight_decay=config.weight_decay
        )
        arch_optimizer = TorchAdam(
            config.arch_learning_rate,
            beta_1=0.5,
            beta_2=0.999,
            epsilon=1e-8,
            coupled_weight_decay=config.arch_weight_decay,
        )
        trainer.compile(
            weight_optimizer,
            arch_optimizer,
            jit_compile=numerics.step_jit_compile(config.jit_compile),
            run_eagerly=config.run_eagerly,
        )
    return network, trainer, schedule


def _check_resumable(run_dir, config):
    saved = run_dir.read_json(runs.CONFIG) if run_dir.file(runs.CONFIG).exists() else {}
    for key, value in config.to_dict().items():
        if key in SearchConfig.RESUME_MAY_CHANGE or key not in saved:
            continue
        same = (
            runs.same_directory(saved[key], value)
            if key == "model_dir" and saved[key] and value
            else saved[key] == value
        )
        if not same:
            raise UserInputError(
                f"--{key}={value!r} differs from the run being resumed ({saved[key]!r}); "
                f"resume with the original value or start a new --model_dir."
            )


def resumed_config(model_dir, overrides):
    """The `SearchConfig` stored in `model_dir`, with `overrides` (the flags given again)
    laid over it: `--resume --model_dir=DIR` alone continues the run as it was started."""
    stored = runs.stored_config(model_dir, "search")
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    if "search_space" not in stored:
        raise UserInputError(
            f"{os.path.join(model_dir, runs.CONFIG)!r} is not the config.json of a search."
        )
    values = {key: value for key, value in stored.items() if key in fields}
    for key, value in overrides.items():
        if key in SearchConfig.RESUME_MAY_CHANGE or key == "model_dir":
            values[key] = value
        elif values.get(key) != value:
            raise UserInputError(
                f"--{key}={value!r} differs from the run being resumed ({values.get(key)!r}); "
                f"resume with the original value or start a new --model_dir."
            )
    return SearchConfig.from_dict({**values, "resume": True, "overwrite": False})


def _restore(run_dir, saved, network):
    """Restores the newest intact checkpoint and truncates the per-epoch records to it.

    Returns:
        (epochs done, steps done of the next epoch, softmax(alpha) history).
    """
    entry = saved.restore()
    done, step = (entry["epoch"], entry["step"]) if entry else (0, 0)
    if entry is not None:
        at = f"step {step} of epoch {done + 1}" if step else f"epoch {done}"
        print(f"Resuming from {entry['path']} (after {at}).", flush=True)
    for name in (runs.METRICS, runs.GENOTYPES):
        run_dir.truncate_jsonl(name, lambda record: record["epoch"] <= done)
    history = {kind: [] for kind in network.arch_weights()}
    if run_dir.file(runs.ALPHAS).exists():
        stored = read_alphas(run_dir.file(runs.ALPHAS))
        history = {kind: stored[kind][:done] for kind in history}
        write_alphas(run_dir.file(runs.ALPHAS), history, network.primitives)
    return done, step, history


def run_search(config):
    """Runs (or resumes) a DARTS search and returns the derived `Genotype`.

    Args:
        config: a `SearchConfig` or a dict of its fields.

    Returns:
        The genotype derived from the alphas at the end of the run (or at
        `stop_after_epoch`).

    Raises:
        UserInputError: a bad setting, dataset or model_dir (before any output is touched).
        RunError: the loss became non-finite (the last good checkpoint is kept).
    """
    if isinstance(config, dict):
        config = SearchConfig.from_dict(config)
    config.validate()
    strategy = distribute.get_strategy(config.strategy)
    # Before the pipeline: tf.data's shuffle seeds combine the global seed and their own.
    keras.utils.set_random_seed(config.seed)
    source = data.load_source(config.dataset, config.data_dir, config.image_size, config.seed)
    dataset, steps_per_epoch = data.search_pipeline(
        source, config.batch_size, config.train_portion, config.seed
    )
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    run_dir = runs.RunDir.prepare(
        config.model_dir, config.resume, config.overwrite, chief=distribute.is_chief(strategy)
    )
    try:
        return _run(config, run_dir, strategy, dataset, steps_per_epoch, source)
    finally:
        run_dir.release()


def _run(config, run_dir, strategy, dataset, steps_per_epoch, source):
    if run_dir.resumed:
        _check_resumable(run_dir, config)
        finished = _finished(run_dir, config)
        if finished is not None:
            done = run_dir.checkpoints().entries()[0]["epoch"]
            how = (
                f"{config.epochs} epochs"
                if done >= config.epochs
                else (f"stopped early after epoch {done} of {config.epochs}")
            )
            print(
                f"The search in {str(run_dir.path)!r} is complete ({how}); nothing to do.",
                flush=True,
            )
            return finished
    else:
        run_dir.write_json(
            runs.CONFIG,
            {
                **config.to_dict(),
                "dataset_info": source.info.to_json_dict(),
                "steps_per_epoch_resolved": steps_per_epoch,
            },
        )

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.mixed_precision or "float32")
    try:
        return _search(config, run_dir, strategy, dataset, steps_per_epoch, source.info)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _finished(run_dir, config):
    """The genotype of a search that has run all `config.epochs` epochs (or that
    `--early_stop` ended), else None."""
    entries = run_dir.checkpoints().entries()
    if not entries or entries[0]["step"] or not run_dir.file(runs.GENOTYPE).exists():
        return None
    records = run_dir.read_jsonl(runs.GENOTYPES)
    early = bool(records) and records[-1].get("stopped_early", False)
    if entries[0]["epoch"] < config.epochs and not early:
        return None
    return Genotype.from_dict(run_dir.read_json(runs.GENOTYPE))


def _search(config, run_dir, strategy, dataset, steps_per_epoch, info):
    keras.utils.set_random_seed(config.seed)
    network, trainer, schedule = _build(config, info.num_classes, strategy)
    groups = dict(
        network=network,
        weight_optimizer=trainer.optimizer,
        arch_optimizer=trainer.arch_optimizer,
        metrics=runs.metric_variables(trainer),
    )
    if trainer.loss_scale is not None:
        groups.update(loss_scale=trainer.loss_scale.scale, good_steps=trainer.loss_scale.good_steps)
    saved = run_dir.checkpoints(**groups)
    done, step, history = _restore(run_dir, saved, network) if run_dir.resumed else (0, 0, None)
    last = min(config.epochs, config.stop_after_epoch or config.epochs)
    stop = runs.StopOnNonFinite()
    interrupt = runs.Interrupt(saved, first_step=step)
    architecture = ArchitectureLogger(run_dir, network, history, config.max_skip, config.early_stop)
    order = "second order" if config.unrolled else "first order"
    beta = config.beta_regularization
    callbacks = [
        runs.FirstStep(f"search step ({order})", bool(config.verbose)),
        runs.SyncState(),
        interrupt,
        optim.EpochLearningRate(schedule),
        *([regularization.BetaDecaySchedule(beta, config.epochs)] if beta else []),
        stop,
        runs.EpochLogger(run_dir, extra=lambda e: _epoch_settings(config, schedule, e)),
        architecture,
        EpochTensorBoard(str(run_dir.file(runs.TENSORBOARD))),
        runs.EpochCheckpoint(saved),  # last: records first, then the state
    ]
    # One endless stream; a resumed run skips the batches it has done.
    stream = dataset.repeat().skip(done * steps_per_epoch + step)
    fit = dict(shuffle=False, verbose=config.verbose)  # the pipeline shuffles
    if step and done < last:  # the rest of an interrupted epoch first
        metrics = groups["metrics"]
        trainer.fit(
            stream,
            epochs=done + 1,
            initial_epoch=done,
            steps_per_epoch=steps_per_epoch - step,
            callbacks=[*callbacks, runs.RestoreMetrics(metrics, done)],
            **fit,
        )
        done += 1
        stream = dataset.repeat().skip(done * steps_per_epoch)
    stopped = runs.interrupted(trainer) or stop.bad_batch is not None
    if done < last and not (stopped or architecture.stopped_early):
        trainer.fit(
            stream,
            epochs=last,
            initial_epoch=done,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            **fit,
        )
    if interrupt.saved:
        epoch, steps_done = trainer.interrupted_at
        raise Interrupted(
            f"Stopped after step {steps_done} of epoch {epoch + 1}; saved {interrupt.saved}."
        )
    stop.check(run_dir.file(runs.CHECKPOINT_DIR))
    genotype = network.genotype(config.max_skip)
    if last == config.epochs or architecture.stopped_early:
        run_dir.write_json(runs.GENOTYPE, genotype.to_dict())
    else:
        print(f"Stopped after epoch {last} of {config.epochs}; continue with --resume.")
    return genotype


def _epoch_settings(config, schedule, epoch):
    """The scheduled settings of `epoch`, logged with its metrics."""
    settings = {"lr": schedule.at_epoch(epoch)}
    if config.beta_regularization:
        settings["beta_coefficient"] = regularization.coefficient_at(
            config.beta_regularization, epoch, config.epochs
        )
    return settings


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, which writes nothing for an interrupted (partial) epoch."""

    def on_epoch_end(self, epoch, logs=None):
        if not runs.interrupted(self.model):
            super().on_epoch_end(epoch, logs)
