"""Tests for pibconv_tf/experiments/sweep.py and apps/sweep.py: Table 1 rows, per-row resume."""

import csv
import json
import os
from pathlib import Path

import pytest

from pibconv_tf.errors import UserInputError
from pibconv_tf.experiments import sweep
from pibconv_tf.model import complexity, genotypes, networks
from pibconv_tf.train import run as training
from tests.test_case import TestCase
from tests.test_train import StopAfter, run_app, temp_dir, tiny_config


class TableTest(TestCase):
    def test_markdown_and_csv(self):
        rows = [
            {
                "genotype": "PIBCONV",
                "layers": 2,
                "test_accuracy": 92.15,
                "best_test_accuracy": 92.5,
                "params_m": 0.385,
                "gmacs": 0.067,
                "epochs": 600,
                "model": "runs/sweep/layers_2/model.keras",
            }
        ]
        markdown = sweep.format_markdown(rows).splitlines()
        self.assertEqual(len(markdown), 3)
        self.assertIn("| PIBCONV | 2 | 92.15 | 92.50 | 0.385 | 0.067 | 600 |", markdown[2])
        parsed = list(csv.DictReader(sweep.format_csv(rows).splitlines()))
        self.assertEqual(parsed[0]["test_accuracy"], "92.15")
        self.assertEqual(list(parsed[0]), list(sweep.COLUMNS))

    def test_bad_layer_lists_and_directories(self):
        with self.assertRaisesRegex(UserInputError, "twice"):
            sweep.check_layer_counts([2, 3, 2])
        with self.assertRaisesRegex(UserInputError, ">= 1"):
            sweep.check_layer_counts([0])
        root = temp_dir(self)
        Path(root, "other.txt").write_text("x")
        with self.assertRaisesRegex(UserInputError, "not empty"):
            sweep.prepare_sweep_dir(root, resume=False, overwrite=False)
        with self.assertRaisesRegex(UserInputError, "no sweep to resume"):
            sweep.prepare_sweep_dir(root, resume=True, overwrite=False)
        self.assertEqual(os.listdir(root), ["other.txt"])


class SweepRunTest(TestCase):
    @pytest.mark.slow
    def test_finished_rows_are_kept_and_interrupted_rows_resume(self):
        root = Path(temp_dir(self)) / "sweep"
        config = tiny_config(root)
        rows = sweep.run_sweep(config, [1])
        self.assertEqual([row["layers"] for row in rows], [1])
        finished = root / "layers_1" / "metrics.jsonl"
        finished_text, finished_mtime = finished.read_text(), finished.stat().st_mtime_ns
        # A sweep killed during row 2's second epoch leaves this behind.
        row2 = tiny_config(root / "layers_2", layers=2)
        with self.assertRaises(KeyboardInterrupt):
            training.train(row2, extra_callbacks=[StopAfter(1)])
        epoch1 = (root / "layers_2" / "metrics.jsonl").read_text()

        with self.assertRaisesRegex(UserInputError, "--init_channels=8 differs"):
            sweep.run_sweep(tiny_config(root, resume=True, init_channels=8), [1, 2])
        resumed = tiny_config(root, resume=True)
        rows = sweep.run_sweep(resumed, [1, 2])
        self.assertEqual(finished.stat().st_mtime_ns, finished_mtime)
        self.assertEqual(finished.read_text(), finished_text)
        metrics = (root / "layers_2" / "metrics.jsonl").read_text()
        self.assertTrue(metrics.startswith(epoch1), "row 2 restarted instead of resuming")
        self.assertEqual([json.loads(line)["epoch"] for line in metrics.splitlines()], [1, 2])

        self.assertEqual([row["layers"] for row in rows], [1, 2])
        for row in rows:
            network = networks.network_cifar(
                genotypes.PIBCONV, init_channels=4, layers=row["layers"], image_size=8
            )
            expected = complexity.model_complexity(network)
            self.assertAlmostEqual(row["params_m"], round(expected["params"] / 1e6, 4))
            self.assertAlmostEqual(row["gmacs"], round(expected["gmacs"], 4))
            result = json.loads((root / f"layers_{row['layers']}" / "result.json").read_text())
            self.assertAlmostEqual(row["test_accuracy"], round(100 * result["test_accuracy"], 2))
        table = (root / "table.md").read_text().splitlines()
        self.assertEqual(len(table), 4)
        self.assertEqual(len((root / "table.csv").read_text().splitlines()), 3)
        stored = json.loads((root / "config.json").read_text())
        self.assertEqual(stored["layers"], [1, 2])


class SweepAppTest(TestCase):
    @pytest.mark.slow
    def test_sweep_then_evaluate_end_to_end(self):
        root = Path(temp_dir(self)) / "sweep"
        args = [
            "--genotype=PIBCONV",
            "--dataset=digits",
            "--image_size=8",
            "--layers=1",
            "--init_channels=4",
            "--epochs=1",
            "--batch_size=8",
            "--cutout_length=4",
            "--steps_per_epoch=3",
            "--verbose=0",
            f"--model_dir={root}",
        ]
        result = run_app("sweep", *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("| PIBCONV | 1 |", result.stdout)
        self.assertTrue((root / "table.md").exists())

        model = root / "layers_1" / "model.keras"
        evaluated = run_app("evaluate", f"--model={model}", "--dataset=digits")
        self.assertEqual(evaluated.returncode, 0, evaluated.stderr)
        numbers = json.loads(evaluated.stdout)
        trained = json.loads((root / "layers_1" / "result.json").read_text())
        # Same split, same normalisation (dataset.json), same weights: the same accuracy.
        self.assertAlmostEqual(numbers["top1"], trained["test_accuracy"], places=5)
        self.assertAlmostEqual(numbers["top5"], trained["test_top5_accuracy"], places=5)
