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

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pibconv_tf import data, distribute, optim, runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.model.search_network import SearchNetwork, build_network
from pibconv_tf.optim import TorchAdam
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

    def __init__(self, run_dir, network, history=None):
        super().__init__()
        self.run_dir = run_dir
        self.network = network
        self.history = history or {"normal": [], "reduce": []}

    def on_epoch_end(self, epoch, logs=None):
        weights = self.network.arch_weights()
        if not all(np.isfinite(w).all() for w in weights.values()):
            return
        genotype = self.network.genotype()
        self.run_dir.append_jsonl(
            runs.GENOTYPES, {"epoch": epoch + 1, "genotype": genotype.to_dict()}
        )
        for kind in ("normal", "reduce"):
            self.history[kind].append(weights[kind])
        write_alphas(self.run_dir.file(runs.ALPHAS), self.history, self.network.primitives)
        logging.info("Epoch %d genotype: %s", epoch + 1, genotype)


def write_alphas(path, history, primitives):
    """Saves the softmax(alpha) history atomically (a crash never leaves half a file)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".alphas.")
    with os.fdopen(fd, "wb") as stream:
        np.savez(
            stream,
            normal=np.asarray(history["normal"], np.float32),
            reduce=np.asarray(history["reduce"], np.float32),
            primitives=np.asarray(primitives),
        )
    os.replace(tmp, path)


def read_alphas(path):
    """The history in `alphas.npz`: {"normal", "reduce"} lists of arrays, and "primitives"."""
    with np.load(path) as arrays:
        return {
            "normal": list(arrays["normal"]),
            "reduce": list(arrays["reduce"]),
            "primitives": tuple(str(p) for p in arrays["primitives"]),
        }


def _build(config, num_classes, strategy, steps_per_epoch):
    """Network, compiled trainer and epoch variable, created in the strategy's scope."""
    with strategy.scope():
        network = SearchNetwork(
            num_classes,
            config.init_channels,
            config.layers,
            config.nodes,
            config.nodes,
            config.search_space,
            seed=config.seed,
        )
        build_network(network, config.image_size)
        trainer = SearchTrainer(
            network,
            order="second" if config.unrolled else "first",
            grad_clip=config.grad_clip,
        )
        schedule = optim.EpochCosineDecay(
            config.learning_rate, config.epochs, steps_per_epoch, config.learning_rate_min
        )
        weight_optimizer = optim.TorchSGD(
            schedule, config.momentum, coupled_weight_decay=config.weight_decay
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
            jit_compile=config.jit_compile,
            run_eagerly=config.run_eagerly,
        )
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    return network, trainer, schedule, epoch


def _check_resumable(run_dir, config):
    saved = run_dir.read_json(runs.CONFIG) if run_dir.file(runs.CONFIG).exists() else {}
    for key, value in config.to_dict().items():
        if key in SearchConfig.RESUME_MAY_CHANGE or key not in saved:
            continue
        if saved[key] != value:
            raise UserInputError(
                f"--{key}={value!r} differs from the run being resumed ({saved[key]!r}); "
                f"resume with the original value or start a new --model_dir."
            )


def _restore(run_dir, manager, epoch, network):
    """Restores the last checkpoint and truncates the per-epoch records to it."""
    manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    done = int(epoch.numpy())
    logging.info(
        "Resuming %s from %s after epoch %d.", run_dir.path, manager.latest_checkpoint, done
    )
    print(f"Resuming from {manager.latest_checkpoint} after epoch {done}.")
    for name in (runs.METRICS, runs.GENOTYPES):
        run_dir.truncate_jsonl(name, lambda record: record["epoch"] <= done)
    history = {"normal": [], "reduce": []}
    if run_dir.file(runs.ALPHAS).exists():
        saved = read_alphas(run_dir.file(runs.ALPHAS))
        history = {kind: saved[kind][:done] for kind in ("normal", "reduce")}
        write_alphas(run_dir.file(runs.ALPHAS), history, network.primitives)
    return done, history


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
    run_dir = runs.RunDir.prepare(config.model_dir, config.resume, config.overwrite)
    if run_dir.resumed:
        _check_resumable(run_dir, config)
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


def _search(config, run_dir, strategy, dataset, steps_per_epoch, info):
    keras.utils.set_random_seed(config.seed)
    network, trainer, schedule, epoch = _build(config, info.num_classes, strategy, steps_per_epoch)
    trackables = dict(
        network=network,
        weight_optimizer=trainer.optimizer,
        arch_optimizer=trainer.arch_optimizer,
        epoch=epoch,
    )
    if trainer.loss_scale is not None:
        trackables.update(
            loss_scale=trainer.loss_scale.scale, good_steps=trainer.loss_scale.good_steps
        )
    manager = run_dir.checkpoint_manager(**trackables)
    done, history = _restore(run_dir, manager, epoch, network) if run_dir.resumed else (0, None)
    last = min(config.epochs, config.stop_after_epoch or config.epochs)
    stop = runs.StopOnNonFinite()
    callbacks = [
        stop,
        runs.EpochLogger(run_dir, extra=lambda e: {"lr": schedule.at_epoch(e)}),
        ArchitectureLogger(run_dir, network, history),
        keras.callbacks.TensorBoard(str(run_dir.file(runs.TENSORBOARD))),
        runs.EpochCheckpoint(manager, epoch),  # last: records first, then the state
    ]
    if done < last:
        # One endless stream; a resumed run skips the batches of the epochs already done.
        stream = dataset.repeat().skip(done * steps_per_epoch)
        trainer.fit(
            stream,
            epochs=last,
            initial_epoch=done,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            shuffle=False,  # the pipeline shuffles
            verbose=config.verbose,
        )
    stop.check(run_dir.file(runs.CHECKPOINT_DIR))
    genotype = network.genotype()
    if last == config.epochs:
        run_dir.write_json(runs.GENOTYPE, genotype.to_dict())
    else:
        print(f"Stopped after epoch {last} of {config.epochs}; continue with --resume.")
    return genotype
