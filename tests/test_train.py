"""Tests for pibconv_tf/train/run.py (the evaluation trainer) and apps/train.py.

Networks are tiny (C=4..8, one cell, 8x8 images); apps run as subprocesses.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from pibconv_tf import data, optim, runs
from pibconv_tf.errors import RunError, UserInputError
from pibconv_tf.model import cells, genotypes, networks
from pibconv_tf.train import callbacks as train_callbacks
from pibconv_tf.train import config as train_config
from pibconv_tf.train import run as training
from pibconv_tf.train import trainer as trainer_lib
from tests import app_process
from tests.test_case import TestCase

REPO = Path(__file__).resolve().parents[1]
SIZE = 8  # image side: the smallest the data module accepts
POOLS = genotypes.Genotype(
    normal=(("avg_pool_3x3", 0), ("avg_pool_3x3", 1)),
    normal_concat=(2,),
    reduce=(("avg_pool_3x3", 0), ("avg_pool_3x3", 1)),
    reduce_concat=(2,),
)


def run_app(app, *args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return app_process.run_app(f"apps.{app}", *args, env=env)


def temp_dir(test):
    """A fresh directory removed after `test` (absl's create_tempdir needs parsed flags)."""
    path = tempfile.mkdtemp(prefix="pibconv_test_")
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_config(model_dir, **overrides):
    values = dict(
        genotype="PIBCONV",
        dataset="digits",
        image_size=SIZE,
        init_channels=4,
        layers=1,
        epochs=2,
        batch_size=8,
        cutout_length=4,
        steps_per_epoch=2,
        model_dir=str(model_dir),
        verbose=0,
    )
    return train_config.TrainConfig(**{**values, **overrides})


def digits_batch(count=32, size=8):
    source = data.load_source("digits", image_size=size)
    images, labels = source.numpy("train", limit=count)
    return data.normalize(images, source.info).numpy(), labels


class StopAfter(keras.callbacks.Callback):
    """Simulates a crash at the end of an epoch, after its checkpoint was saved."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt("simulated crash")


class TrainerTest(TestCase):
    def test_overfits_32_images(self):
        images, labels = digits_batch(32)
        network = networks.network_cifar(
            genotypes.PIBCONV, init_channels=8, layers=1, auxiliary=True, image_size=SIZE
        )
        trainer = trainer_lib.AuxiliaryTrainer(network, auxiliary_weight=0.4)
        optimizer = optim.TorchSGD(0.05, 0.9, global_clipnorm=5.0)
        trainer.compile(optimizer=optimizer)
        optimizer.build(network.trainable_variables)  # else the first step traces twice
        first = trainer.evaluate(images, labels, verbose=0, return_dict=True)
        history = trainer.fit(images, labels, batch_size=8, epochs=30, verbose=0)
        final = trainer.evaluate(images, labels, verbose=0, return_dict=True)
        self.assertLess(history.history["loss"][-1], history.history["loss"][0] / 10)
        self.assertLess(final["loss"], first["loss"] / 10)
        self.assertEqual(final["accuracy"], 1.0)

    def test_loss_adds_weighted_auxiliary_cross_entropy(self):
        images, labels = digits_batch(8)
        network = networks.network_cifar(
            genotypes.PIBCONV, init_channels=4, layers=1, auxiliary=True, image_size=SIZE
        )
        outputs = network(images, training=True)  # drop path is 0: deterministic
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        main = float(ce(labels, outputs["logits"]))
        aux = float(ce(labels, outputs["aux_logits"]))
        self.assertNotAlmostEqual(main, aux, places=3)
        for weight in (0.0, 0.4, 1.5):
            trainer = trainer_lib.AuxiliaryTrainer(network, auxiliary_weight=weight)
            loss, logits = trainer.losses_of(labels, outputs)
            self.assertAllClose(loss, main + weight * aux, atol=1e-5, rtol=1e-5)
            self.assertAllClose(logits, outputs["logits"])
        # The compiled train step reports the same loss (lr 0 keeps the weights put).
        trainer = trainer_lib.AuxiliaryTrainer(network, auxiliary_weight=0.4)
        trainer.compile(optimizer=optim.TorchSGD(0.0))
        logs = trainer.train_on_batch(images, labels, return_dict=True)
        self.assertAllClose(logs["loss"], main + 0.4 * aux, atol=1e-5, rtol=1e-5)

    def test_auxiliary_weight_zero_builds_no_head(self):
        images, labels = digits_batch(8)
        config = tiny_config(None, auxiliary_weight=0.0)
        network, trainer, _ = trainer_lib.build_trainer(config, genotypes.PIBCONV, 10, SIZE)
        self.assertNotIsInstance(network.output, dict)
        logits = network(images, training=True)
        loss, _ = trainer.losses_of(labels, logits)
        expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
        self.assertAllClose(loss, expected, atol=1e-6, rtol=1e-6)

    def test_drop_path_zeroes_whole_samples_at_rate(self):
        x = tf.ones((4000, 2, 2, 3))
        y = cells.drop_path(x, 0.5, keras.random.SeedGenerator(3)).numpy()
        per_sample = y.reshape(len(y), -1)
        # Each sample is all zeros or all 1/(1-rate): whole samples drop.
        self.assertTrue(np.all((per_sample == 0).all(1) | (per_sample == 2).all(1)))
        dropped = (per_sample == 0).all(1).mean()
        self.assertAlmostEqual(dropped, 0.5, delta=4 * np.sqrt(0.25 / len(y)))

    def test_cell_drop_path_in_training_identity_at_inference(self):
        cell = cells.Cell(POOLS, filters=4, seed=0)
        s0, s1 = (tf.random.normal((2000, 8, 8, 4), seed=i) for i in (1, 2))
        cell([s0, s1])
        reference = cell([s0, s1], training=True).numpy()  # rate 0: no drop
        inference = cell([s0, s1], training=False).numpy()
        cells.set_drop_path_rate(keras.Sequential([cell]), 0.5)
        self.assertAllClose(cell([s0, s1], training=False), inference)
        dropped = cell([s0, s1], training=True).numpy()
        # The node is pool(pre0(s0)) + pool(pre1(s1)); find each term's keep mask per sample.
        terms = [
            cell.edge_ops[i](pre(s, training=True)).numpy()
            for i, (pre, s) in enumerate(((cell.preprocess0, s0), (cell.preprocess1, s1)))
        ]
        self.assertAllClose(reference, terms[0] + terms[1], atol=1e-5)
        masks = [(m0, m1) for m0 in (0, 1) for m1 in (0, 1)]
        candidates = np.stack([2 * (m0 * terms[0] + m1 * terms[1]) for m0, m1 in masks])
        errors = np.abs(candidates - dropped[None]).reshape(4, len(dropped), -1).max(-1)
        self.assertTrue(np.all(errors.min(0) < 1e-4), "a sample is not a whole-term drop")
        kept = np.array(masks)[errors.argmin(0)]
        self.assertAlmostEqual(kept.mean(), 0.5, delta=4 * np.sqrt(0.25 / kept.size))

    def test_export_is_logits_only_float32_and_round_trips(self):
        images, labels = digits_batch(8)
        config = tiny_config(None, mixed_precision="mixed_bfloat16")
        with train_callbacks.dtype_policy(config.mixed_precision):
            network, trainer, _ = trainer_lib.build_trainer(config, genotypes.PIBCONV, 10, SIZE)
        trainer.train_on_batch(images, labels)
        cells.set_drop_path_rate(network, 0.3)
        info = data.load_source("digits", image_size=SIZE).info
        export = train_callbacks.ModelExport(
            network, lambda: training._inference_network(config, genotypes.PIBCONV, info)
        )
        path = os.path.join(temp_dir(self), "model.keras")
        export.save(path)
        restored = keras.saving.load_model(path)
        self.assertEqual(restored.output.dtype, "float32")
        self.assertNotIsInstance(restored.output, dict)
        for layer in restored.layers:
            if isinstance(layer, cells.Cell):
                self.assertEqual(float(layer.drop_path_rate.numpy()), 0.0)
        expected = export.model()(images, training=False)
        np.testing.assert_array_equal(restored(images, training=False), expected)
        # Same weights as the trained network (up to its bfloat16 compute).
        trained = networks.inference_model(network)(images, training=False)
        self.assertAllClose(expected, tf.cast(trained, "float32"), atol=0.1, rtol=0.1)

    def test_config_validation_names_the_field(self):
        for field, value in (
            ("init_channels", 5),
            ("epochs", 0),
            ("drop_path_prob", 1.0),
            ("auxiliary_weight", -1.0),
            ("mixed_precision", "float8"),
        ):
            with self.assertRaisesRegex(UserInputError, field):
                train_config.TrainConfig(**{field: value}).validate()

    def test_schedules(self):
        config = train_config.TrainConfig(epochs=600)
        schedule = trainer_lib.lr_schedule(config)
        self.assertAllClose(schedule.at_epoch(0), 0.025)
        self.assertAllClose(schedule.at_epoch(300), 0.0125, atol=1e-7)
        self.assertAllClose(trainer_lib.drop_path_rate(config, 300), 0.1)
        self.assertEqual(trainer_lib.drop_path_rate(config, 0), 0.0)


class TrainRunTest(TestCase):
    @pytest.mark.slow
    def test_resume_continues_epochs_and_schedule(self):
        root = Path(temp_dir(self))
        # eval_every=2: the test split is evaluated at epoch 2 only (the last one).
        straight = training.train(tiny_config(root / "straight", eval_every=2))
        with self.assertRaises(KeyboardInterrupt):
            training.train(
                tiny_config(root / "split", eval_every=2), extra_callbacks=[StopAfter(1)]
            )
        self.assertFalse((root / "split" / runs.MODEL).exists())
        with self.assertRaisesRegex(UserInputError, "layers"):
            training.train(tiny_config(root / "split", layers=2, resume=True))
        resumed = training.train(tiny_config(root / "split", eval_every=2, resume=True))
        records = {}
        for run in ("straight", "split"):
            lines = (root / run / "metrics.jsonl").read_text().splitlines()
            records[run] = [json.loads(line) for line in lines]
        self.assertEqual([r["epoch"] for r in records["split"]], [1, 2])
        for run in ("straight", "split"):
            self.assertEqual(["test_accuracy" in r for r in records[run]], [False, True])
        for key in ("epoch", "learning_rate", "drop_path_prob"):
            self.assertEqual(
                [r[key] for r in records["split"]], [r[key] for r in records["straight"]]
            )
        self.assertAllClose(records["split"][0]["loss"], records["straight"][0]["loss"])
        self.assertEqual(resumed["epochs"], straight["epochs"])
        for run in ("straight", "split"):
            for name in ("model.keras", "model_best.keras", "genotype.json", "dataset.json"):
                self.assertTrue((root / run / name).exists(), f"{run}/{name}")
        self.assertEqual(
            json.loads((root / "split" / "dataset.json").read_text())["class_names"],
            [str(d) for d in range(10)],
        )

    def test_resume_of_a_checkpoint_of_other_layers_fails_clearly_and_changes_nothing(self):
        root = Path(temp_dir(self))
        training.train(tiny_config(root, epochs=1))
        before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
        build = trainer_lib.build_trainer

        def build_other_layers(*args, **kwargs):  # as a later version with a new layer
            network, trainer, optimizer = build(*args, **kwargs)
            network.extra_layer = keras.layers.Dense(2)
            network.extra_layer.build((None, 3))
            return network, trainer, optimizer

        def build_other_shapes(config, *args, **kwargs):  # same objects, other shapes
            return build(dataclasses.replace(config, init_channels=6), *args, **kwargs)

        for builder in (build_other_layers, build_other_shapes):
            with (
                mock.patch.object(training, "build_trainer", builder),
                self.assertRaisesRegex(UserInputError, "does not match the run being resumed"),
            ):
                training.train(tiny_config(root, epochs=2, resume=True))
            after = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
            self.assertEqual(after, before, builder.__name__)

    def test_a_saved_model_that_evaluates_otherwise_than_recorded_is_reported(self):
        root = Path(temp_dir(self))
        model = training.ModelExport.model

        def broken(export):  # as the lost cell BatchNorm statistics of 0.1 did
            copy = model(export)
            for weight in copy.weights:
                if "moving_variance" in weight.path:
                    weight.assign(np.full(weight.shape, 1e-3, "float32"))
            return copy

        with (
            mock.patch.object(training.ModelExport, "model", broken),
            self.assertLogs(level="WARNING") as logs,
        ):
            training.train(tiny_config(root, epochs=1))
        self.assertRegex(
            "\n".join(logs.output), r"model\.keras evaluates to test top-1 .*but the last"
        )

    def test_non_finite_loss_stops_and_keeps_checkpoint(self):
        root = Path(temp_dir(self))
        config = tiny_config(root / "run", learning_rate=1e12, grad_clip=0.0, epochs=3)
        with self.assertRaisesRegex(RunError, "non-finite"):
            training.train(config)
        self.assertFalse((root / "run" / runs.MODEL).exists())


MIRRORED_SCRIPT = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from pibconv_tf import data
from pibconv_tf import distribute
from pibconv_tf.model import genotypes
from pibconv_tf.train import config as train_config
from pibconv_tf.train import trainer as trainer_lib
distribute.configure_graph_optimizer("auto")  # as the apps: no Grappler on a CPU
config = train_config.TrainConfig(init_channels=4, layers=1, grad_clip=0.01, weight_decay=3e-4)
source = data.load_source("digits", image_size=8)
images, labels = source.numpy("train", limit=8)
images = data.normalize(images, source.info).numpy()

def build(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        return trainer_lib.build_trainer(config, genotypes.PIBCONV, 10, 8)

# Reference: the mean of the two half-batch gradients (each with its own batch statistics,
# as on two devices), clipped as a whole, then PyTorch's first SGD step.
network, trainer, _ = build(distribute.get_strategy("one_device", ["/cpu:0"]))
weights = [v.numpy() for v in network.trainable_variables]
halves = []
for part in (slice(0, 4), slice(4, 8)):
    with tf.GradientTape() as tape:
        loss, _ = trainer.losses_of(labels[part], network(images[part], training=True))
    halves.append(tape.gradient(loss, network.trainable_variables))
mean = [(a + b) / 2 for a, b in zip(*halves)]
clipped, _ = tf.clip_by_global_norm(mean, config.grad_clip)
expected = [-config.learning_rate * (g.numpy() + config.weight_decay * w)
            for g, w in zip(clipped, weights)]

mirrored = distribute.get_strategy("mirrored", ["/cpu:0", "/cpu:1"])
assert mirrored.num_replicas_in_sync == 2
network, trainer, _ = build(mirrored)
dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
trainer.fit(dataset, epochs=1, verbose=0)
for v, w, e in zip(network.trainable_variables, weights, expected):
    np.testing.assert_allclose(v.numpy() - w, e, atol=1e-7, rtol=1e-3, err_msg=v.path)
print("same update")
"""


class DistributedTest(TestCase):
    @pytest.mark.slow
    def test_two_replicas_clip_the_global_gradient_like_one_device(self):
        # Logical devices must be set before TensorFlow starts: a fresh process.
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        result = subprocess.run(
            [sys.executable, "-c", MIRRORED_SCRIPT],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("same update", result.stdout)


class TrainAppTest(TestCase):
    def test_unknown_genotype(self):
        model_dir = Path(temp_dir(self)) / "run"
        result = run_app("train", "--genotype=NOPE", "--dataset=digits", f"--model_dir={model_dir}")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("error: Genotype 'NOPE' is neither a named genotype", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(model_dir.exists())

    @pytest.mark.slow
    def test_refuses_a_non_empty_model_dir_and_resumes_with_the_stored_config(self):
        model_dir = Path(temp_dir(self)) / "run"
        tiny = [
            "--dataset=digits",
            "--image_size=8",
            "--layers=1",
            "--init_channels=4",
            "--batch_size=8",
            "--cutout_length=4",
            "--steps_per_epoch=2",
            "--verbose=2",
            f"--model_dir={model_dir}",
        ]
        first = run_app("train", "--epochs=1", *tiny)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn("epoch 1/1", first.stdout)
        before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}

        refused = run_app("train", "--dataset=digits", f"--model_dir={model_dir}")
        self.assertEqual(refused.returncode, 1, refused.stderr)
        self.assertIn("is not empty; pass --resume", refused.stderr)
        self.assertEqual({p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}, before)

        # Only --epochs is given again: the rest (layers=1, 8x8 images, ...) is the run's own.
        resumed = run_app("train", "--resume", f"--model_dir={model_dir}", "--epochs=2")
        self.assertEqual(resumed.returncode, 0, resumed.stderr)
        self.assertIn("epoch 2/2", resumed.stdout)
        config = json.loads((model_dir / "config.json").read_text())
        self.assertEqual((config["layers"], config["image_size"], config["epochs"]), (1, 8, 2))
        lines = (model_dir / "metrics.jsonl").read_text().splitlines()
        self.assertEqual([json.loads(line)["epoch"] for line in lines], [1, 2])


# Long enough epochs (40 steps of 8 images) that a signal sent after epoch 1's checkpoint
# lands inside epoch 2.
_EXACT = [
    "--dataset=digits",
    "--image_size=8",
    "--layers=1",
    "--init_channels=4",
    "--batch_size=8",
    "--cutout_length=4",
    "--steps_per_epoch=40",
    "--epochs=3",
    "--drop_path_prob=0.3",  # drop path draws in every step
    "--verbose=0",
]
_TIMING = {"seconds", "train_seconds", "images_per_second"}


def _metrics(model_dir):
    lines = (Path(model_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMING} for line in lines]


def _weights(model_dir):
    return [w.copy() for w in keras.saving.load_model(Path(model_dir) / runs.MODEL).get_weights()]


def _start(model_dir, *extra):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "apps.train", f"--model_dir={model_dir}", *_EXACT, *extra]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(path, process, timeout=600):
    import time  # noqa: PLC0415

    start = time.monotonic()
    while not Path(path).exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {path}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


@pytest.mark.slow
class ExactResumeTest(TestCase):
    """A run stopped at any point and resumed ends with the weights and metrics of the run
    that never stopped (issue 20): the same data order, augmentation draws and drop-path
    masks, and every variable in the checkpoint (issue 21's BatchNorm statistics)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = Path(tempfile.mkdtemp(prefix="pibconv_exact_"))
        straight = run_app("train", f"--model_dir={cls.root / 'straight'}", *_EXACT)
        assert straight.returncode == 0, straight.stderr[-3000:]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def assertSameRun(self, model_dir):
        straight = self.root / "straight"
        self.assertEqual(_metrics(model_dir), _metrics(straight))
        for a, b in zip(_weights(model_dir), _weights(straight), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        self.assertEqual(
            json.loads((Path(model_dir) / runs.RESULT).read_text())["test_accuracy"],
            json.loads((straight / runs.RESULT).read_text())["test_accuracy"],
        )

    def test_killed_mid_epoch_and_resumed(self):
        model_dir = self.root / "killed"
        process = _start(model_dir)
        _wait_for(model_dir / "checkpoints" / "epoch-0001.npz", process)
        process.kill()  # SIGKILL: nothing of epoch 2 is saved
        process.wait(timeout=60)
        self.assertFalse((model_dir / runs.MODEL).exists(), "killed too late")
        resumed = run_app("train", "--resume", f"--model_dir={model_dir}")
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
        self.assertIn("Taking over", resumed.stderr)  # the killed run's lock
        self.assertSameRun(model_dir)

    def test_ctrl_c_saves_the_step_and_resume_ends_as_the_uninterrupted_run(self):
        model_dir = self.root / "interrupted"
        process = _start(model_dir)
        _wait_for(model_dir / "checkpoints" / "epoch-0001.npz", process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 130, stderr[-3000:])
        self.assertRegex(stderr, r"Stopped after step \d+ of epoch 2; saved .*epoch-0001-step-")
        self.assertIn(f"python -m apps.train --resume --model_dir={model_dir}", stderr)
        self.assertFalse((model_dir / runs.MODEL).exists())
        resumed = run_app("train", "--resume", f"--model_dir={model_dir}")
        self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
        self.assertRegex(resumed.stdout, r"Resuming from .*step-\d+\.npz \(after step \d+ of")
        self.assertSameRun(model_dir)

    def test_resuming_a_finished_run_changes_nothing(self):
        model_dir = self.root / "finished"
        shutil.copytree(self.root / "straight", model_dir)
        before = {
            str(p.relative_to(model_dir)): p.read_bytes()
            for p in model_dir.rglob("*")
            if p.is_file()
        }
        again = run_app("train", "--resume", f"--model_dir={model_dir}")
        self.assertEqual(again.returncode, 0, again.stderr[-3000:])
        self.assertIn("is complete (3 of 3 epochs); nothing to do", again.stdout)
        after = {
            str(p.relative_to(model_dir)): p.read_bytes()
            for p in model_dir.rglob("*")
            if p.is_file()
        }
        self.assertEqual(after, before)  # model.keras byte-identical, result.json as it was

    def test_resume_accepts_the_same_directory_written_otherwise(self):
        model_dir = self.root / "relative"
        shutil.copytree(self.root / "straight", model_dir)
        relative = os.path.relpath(model_dir, REPO) + "/"
        again = run_app("train", "--resume", f"--model_dir={relative}", "--epochs=3")
        self.assertEqual(again.returncode, 0, again.stderr[-3000:])
