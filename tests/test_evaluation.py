"""Tests for pibconv_tf/evaluation.py and apps/evaluate.py (tiny models, 8x8 images)."""

import dataclasses
import json
import os
import zipfile

import keras
import numpy as np

from pibconv_tf import data, evaluation
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import genotypes, networks
from tests.test_case import TestCase
from tests.test_train import run_app, temp_dir

SIZE = 8


def tiny_network(num_classes=7, size=SIZE):
    keras.utils.set_random_seed(0)
    return networks.network_cifar(
        genotypes.PIBCONV, num_classes=num_classes, init_channels=4, layers=1, image_size=size
    )


def random_source(num_classes=7, train=24, test=13, seed=0):
    rng = np.random.default_rng(seed)

    def split(count):
        images = rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
        return images, rng.integers(0, num_classes, count).astype(np.int32)

    names = [f"c{i}" for i in range(num_classes)]
    return data.array_source("random", split(train), split(test), names)


def direct_numbers(model, source, split="test"):
    images, labels = source.numpy(split)
    logits = model.predict(data.normalize(images, source.info).numpy(), verbose=0)
    logits = logits.astype(np.float64)
    order = np.argsort(-logits, axis=1)
    top1 = np.mean(order[:, 0] == labels)
    top5 = np.mean([label in row[:5] for label, row in zip(labels, order, strict=True)])
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    loss = -np.mean(log_probs[np.arange(len(labels)), labels])
    return top1, top5, loss, len(labels)


class EvaluateTest(TestCase):
    def test_numbers_match_direct_computation(self):
        model, source = tiny_network(), random_source()
        # A batch size that leaves a partial last batch.
        results = evaluation.evaluate(model, source, "test", batch_size=5)
        top1, top5, loss, count = direct_numbers(model, source)
        self.assertEqual(results["num_images"], count)
        self.assertAlmostEqual(results["top1"], top1)
        self.assertAlmostEqual(results["top5"], top5)
        self.assertAllClose(results["loss"], loss, atol=1e-5, rtol=1e-5)
        self.assertGreater(results["images_per_second"], 0)
        train = evaluation.evaluate(model, source, "train", batch_size=8)
        self.assertEqual(train["num_images"], 24)

    def test_topk_hits_counts_ties_as_hits(self):
        logits = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
        labels = np.array([0, 1, 0])
        self.assertEqual(evaluation.topk_hits(logits, labels, k=2), (2, 2))
        self.assertEqual(evaluation.topk_hits(logits, labels, k=5), (2, 3))

    def test_incompatible_models_are_refused(self):
        source = random_source(num_classes=7)
        with self.assertRaisesRegex(UserInputError, "has 3 classes, but dataset 'random' has 7"):
            evaluation.check_compatible(tiny_network(num_classes=3), source.info, "m.keras")
        with self.assertRaisesRegex(UserInputError, r"takes inputs of shape \(16, 16, 3\)"):
            evaluation.check_compatible(tiny_network(size=16), source.info, "m.keras")
        evaluation.check_compatible(tiny_network(), source.info)  # fits: no error

    def test_unreadable_model_files(self):
        root = temp_dir(self)
        with self.assertRaisesRegex(UserInputError, "does not exist"):
            evaluation.load_model(os.path.join(root, "missing.keras"))
        text = os.path.join(root, "notes.keras")
        with open(text, "w") as stream:
            stream.write("not a model")
        with self.assertRaisesRegex(UserInputError, "not a .keras model file"):
            evaluation.load_model(text)
        archive = os.path.join(root, "other.keras")
        with zipfile.ZipFile(archive, "w") as stream:
            stream.writestr("readme.txt", "a zip, but no Keras model")
        with self.assertRaisesRegex(UserInputError, "could not be loaded"):
            evaluation.load_model(archive)

    def test_evaluate_file_uses_training_normalisation_and_seed(self):
        root = temp_dir(self)
        model = tiny_network(num_classes=10)
        path = os.path.join(root, "model.keras")
        model.save(path)
        trained = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.4, 0.3]}
        with open(os.path.join(root, "dataset.json"), "w") as stream:
            json.dump(trained, stream)
        with open(os.path.join(root, "config.json"), "w") as stream:
            json.dump({"seed": 3}, stream)
        output = os.path.join(root, "eval", "results.json")
        config = evaluation.EvaluateConfig(model=path, dataset="digits", output=output)
        results = evaluation.evaluate_file(config)
        source = data.load_source("digits", image_size=SIZE, seed=3)
        source.info = dataclasses.replace(source.info, mean=(0.1, 0.2, 0.3), std=(0.5, 0.4, 0.3))
        top1, top5, _, count = direct_numbers(model, source)
        self.assertEqual((results["seed"], results["num_images"]), (3, count))
        self.assertEqual(results["normalization"], "dataset.json")
        self.assertAlmostEqual(results["top1"], top1)
        self.assertAlmostEqual(results["top5"], top5)
        self.assertGreater(results["params"], 0)
        self.assertGreater(results["gmacs"], 0)
        with open(output) as stream:
            self.assertEqual(json.load(stream)["top1"], results["top1"])


class EvaluateAppTest(TestCase):
    def test_class_count_mismatch_is_refused(self):
        root = temp_dir(self)
        path = os.path.join(root, "model.keras")
        tiny_network(num_classes=3).save(path)
        output = os.path.join(root, "results.json")
        result = run_app("evaluate", f"--model={path}", "--dataset=digits", f"--output={output}")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("has 3 classes, but dataset 'digits' has 10", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(output))

    def test_missing_model_file(self):
        path = os.path.join(temp_dir(self), "nothing.keras")
        result = run_app("evaluate", f"--model={path}", "--dataset=digits")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("does not exist", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
