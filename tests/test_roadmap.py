"""Tests for pibconv_tf/roadmap.py and apps/roadmap.py: the paper's Fig. 1 procedure."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pibconv_tf.errors import UserInputError
from pibconv_tf.experiments import roadmap
from pibconv_tf.model.genotypes import Genotype
from pibconv_tf.search.config import SearchConfig
from pibconv_tf.train import config as train_config
from tests.test_case import TestCase
from tests.test_train import REPO, run_app, temp_dir

# Every stage searched and trained in seconds: 8x8 digits, 3 search cells of 1 node, C=4.
_TINY = [
    "--dataset=digits",
    "--image_size=8",
    "--search_layers=3",
    "--search_channels=4",
    "--search_nodes=1",
    "--search_epochs=2",
    "--search_batch_size=16",
    "--search_steps_per_epoch=12",  # epoch 2 lasts a second: time to kill it mid-way
    "--layers=2",
    "--init_channels=4",
    "--epochs=1",
    "--batch_size=16",
    "--steps_per_epoch=2",
    "--cutout_length=4",
    "--verbose=2",
]


def _run(stage, seed, accuracy, val, params=0.1):
    return {
        "stage": stage,
        "search_space": stage,
        "seed": seed,
        "genotype": f"{stage}-{seed}",
        "search_val_accuracy": val,
        "test_accuracy": accuracy,
        "params_m": params + seed,
        "gmacs": 0.01,
        "search_seconds": 10.0 * (seed + 1),
        "train_seconds": 2.0,
    }


class StageRowsTest(TestCase):
    def test_mean_spread_and_selection_by_search_validation(self):
        runs = [_run("darts", 0, 90.0, 50.0), _run("darts", 1, 94.0, 60.0)]
        runs.append(_run("pibconv", 0, 96.0, 55.0))
        rows = roadmap.stage_rows(runs, ("darts", "pibconv", "convnext"))
        self.assertEqual([row["stage"] for row in rows], ["darts", "pibconv"])  # no runs yet
        darts = rows[0]
        self.assertEqual((darts["seeds"], darts["test_accuracy"]), (2, 92.0))
        self.assertEqual(darts["test_accuracy_std"], 2.0)
        # DARTS' protocol: the genotype of the best search validation, not the best test.
        self.assertEqual((darts["selected_seed"], darts["genotype"]), (1, "darts-1"))
        self.assertEqual(darts["params_m"], 1.1)
        self.assertEqual(darts["search_seconds"], 15.0)
        markdown = roadmap.format_markdown(rows, runs)
        self.assertIn("| darts | 2 | 92.00 ± 2.00 |", markdown)
        self.assertIn("| pibconv | 1 | 96.00 |", markdown)

    def test_bad_settings_fail_with_one_sentence(self):
        def config(**changes):
            values = dict(output_dir="unused", search=SearchConfig(dataset="digits"))
            return roadmap.RoadmapConfig(**{**values, **changes})

        with self.assertRaisesRegex(UserInputError, "'pibconv_f0', which is not a search"):
            config(stages=("darts", "pibconv_f0")).validate()
        with self.assertRaisesRegex(UserInputError, "stage twice"):
            config(stages=("darts", "darts")).validate()
        with self.assertRaisesRegex(UserInputError, "seed twice"):
            config(seeds=(1, 1)).validate()
        with self.assertRaisesRegex(UserInputError, "--learning_rate"):
            config(train=train_config.TrainConfig(learning_rate=-1.0)).validate()
        with self.assertRaisesRegex(UserInputError, "--layers"):
            config(search=SearchConfig(layers=2)).validate()
        config(stages=("pibconv_f3", "pibconv_gelu")).validate()

    def test_app_refuses_bad_input_before_writing(self):
        root = Path(temp_dir(self)) / "roadmap"
        result = run_app("roadmap", f"--model_dir={root}", "--stages=darts,nope", *_TINY)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("'nope', which is not a search space", result.stderr)
        self.assertFalse(root.exists())
        result = run_app("roadmap", f"--model_dir={root}", "--resume", *_TINY)
        self.assertEqual(result.returncode, 1)
        self.assertIn("holds no roadmap to resume", result.stderr)


def _wait_for(path, process, timeout=600):
    start = time.monotonic()
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the roadmap ended (exit {process.returncode}) before {path}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


@pytest.mark.slow
class RoadmapAppTest(TestCase):
    def test_every_stage_gets_a_row_and_a_killed_roadmap_resumes(self):
        root = Path(temp_dir(self)) / "roadmap"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        # Three of the stages (every stage is one search space; test_operations covers
        # them all): the first, the one killed, and the paper's.
        stages = ("darts", "darts_gelu", "pibconv")
        command = [
            *(sys.executable, "-m", "apps.roadmap", f"--model_dir={root}"),
            f"--stages={','.join(stages)}",
            *_TINY,
        ]
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # Killed during the second stage's search, after its first epoch's checkpoint.
        search = root / "darts_gelu" / "seed_0" / "search"
        _wait_for(search / "checkpoints" / "epoch-0001.npz", process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        killed = root / "darts_gelu" / "seed_0" / "search"
        self.assertFalse((killed / "genotype.json").exists(), "killed too late")
        first = root / "darts" / "seed_0" / "train" / "result.json"
        first_mtime = first.stat().st_mtime_ns
        result = run_app("roadmap", f"--model_dir={root}", "--resume")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("search: finished earlier", result.stdout)
        self.assertIn("search: resuming in", result.stdout)  # the killed search's epoch 2
        self.assertEqual(first.stat().st_mtime_ns, first_mtime)  # stage 1 is not run again

        with open(root / roadmap.TABLE_CSV) as stream:
            rows = list(csv.DictReader(stream))
        self.assertEqual([row["stage"] for row in rows], list(stages))
        for row in rows:
            genotype = Genotype.from_json(row["genotype"])
            self.assertEqual(genotype.search_space, row["stage"])
            self.assertTrue(0.0 < float(row["test_accuracy"]) <= 100.0)
            self.assertGreater(float(row["params_m"]), 0.0)
            self.assertGreater(float(row["gmacs"]), 0.0)
            self.assertGreater(float(row["search_seconds"]), 0.0)
        # The killed search ended with its two epochs, once each.
        metrics = root / "darts_gelu" / "seed_0" / "search" / "metrics.jsonl"
        epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
        self.assertEqual(epochs, [1, 2])
        for name in (roadmap.TABLE_MD, roadmap.RUNS_CSV, roadmap.FIGURE, "config.json"):
            self.assertGreater((root / name).stat().st_size, 0, name)
        stored = json.loads((root / "config.json").read_text())
        self.assertEqual(stored["search"]["layers"], 3)
        self.assertEqual(stored["train"]["layers"], 2)
        # A changed setting on resume is refused by name; nothing is rewritten.
        table = (root / roadmap.TABLE_MD).read_text()
        result = run_app("roadmap", f"--model_dir={root}", "--resume", "--search_layers=4")
        self.assertEqual(result.returncode, 1)
        self.assertIn("layers=4 differs from the roadmap being resumed", result.stderr)
        self.assertEqual((root / roadmap.TABLE_MD).read_text(), table)
