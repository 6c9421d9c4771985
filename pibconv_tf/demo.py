"""The whole job end to end: search -> train -> evaluate -> export -> edge run -> pictures.

Each stage is one of the project's apps, run as a subprocess exactly as a user would type it
(the command is printed first), so the demo doubles as a worked example of every app. The
stages write into one directory; a failed stage stops the pipeline with its name.
"""

import dataclasses
import json
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

from pibconv_tf.errors import RunError, UserInputError
from pibconv_tf.runs import RunDir

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of the end-to-end run (defaults: the embedded digits, ~10 min on 2 cores)."""

    output_dir: str = "runs/demo"
    dataset: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    search_space: str = "pibconv"
    search_epochs: int = 2
    search_layers: int = 3
    search_channels: int = 8
    search_batch_size: int = 32
    search_steps_per_epoch: int = 0
    train_epochs: int = 10
    train_layers: int = 2
    train_channels: int = 16
    train_batch_size: int = 32
    train_steps_per_epoch: int = 0
    calibration_images: int = 200
    parity_images: int = 200
    edge_images: int = 4
    benchmark_runs: int = 100
    overwrite: bool = False
    verbose: int = 2
    # Passed on to every TensorFlow app: e.g. ("--graph_optimizer=on", "--intra_op_threads=0").
    runtime_flags: tuple[str, ...] = ()

    def validate(self):
        positive = [f.name for f in dataclasses.fields(self) if f.type is int and f.name != "seed"]
        for name in positive:
            minimum = 0 if name.endswith("steps_per_epoch") else 1
            if getattr(self, name) < minimum:
                raise UserInputError(f"--{name} must be >= {minimum}, got {getattr(self, name)}.")


class Pipeline:
    """Runs the stages in order into `config.output_dir`, printing each command."""

    def __init__(self, config):
        self.config = config
        self.root = pathlib.Path(config.output_dir)
        self.stage_seconds = {}

    def path(self, *parts):
        return self.root.joinpath(*parts)

    def app(self, stage, module, *args):
        self.run(stage, [sys.executable, "-m", module, *args])

    def run(self, stage, command):
        shown = " ".join(shlex.quote(part) for part in command[1:])
        print(f"\n=== [{stage}] python {shown}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO)
        self.stage_seconds[stage] = round(time.perf_counter() - start, 1)
        if result.returncode != 0:
            raise RunError(
                f"The {stage} stage failed (exit {result.returncode}); its output is above and "
                f"its files are in {self.root}."
            )

    def data_flags(self):
        flags = [f"--dataset={self.config.dataset}", f"--seed={self.config.seed}"]
        if self.config.data_dir:
            flags.append(f"--data_dir={self.config.data_dir}")
        return flags + list(self.config.runtime_flags)

    def search(self):
        c = self.config
        self.app(
            "search",
            "apps.search",
            *self.data_flags(),
            f"--model_dir={self.path('search')}",
            f"--search_space={c.search_space}",
            f"--epochs={c.search_epochs}",
            f"--layers={c.search_layers}",
            f"--init_channels={c.search_channels}",
            f"--batch_size={c.search_batch_size}",
            f"--steps_per_epoch={c.search_steps_per_epoch}",
            f"--verbose={c.verbose}",
        )

    def train(self):
        c = self.config
        self.app(
            "train",
            "apps.train",
            *self.data_flags(),
            f"--genotype={self.path('search', 'genotype.json')}",
            f"--model_dir={self.path('train')}",
            f"--layers={c.train_layers}",
            f"--init_channels={c.train_channels}",
            f"--epochs={c.train_epochs}",
            f"--batch_size={c.train_batch_size}",
            f"--steps_per_epoch={c.train_steps_per_epoch}",
            f"--verbose={c.verbose}",
        )

    def evaluate(self):
        self.app(
            "evaluate",
            "apps.evaluate",
            *self.data_flags(),
            f"--model={self.path('train', 'model.keras')}",
            f"--output={self.path('evaluate.json')}",
        )

    def export(self):
        c = self.config
        self.app(
            "export",
            "apps.export",
            *self.data_flags(),
            f"--model={self.path('train', 'model.keras')}",
            f"--output_dir={self.path('export')}",
            "--formats=saved_model,tflite_fp32,tflite_int8,tflite_int8_mixed",
            f"--calibration_images={c.calibration_images}",
            f"--parity_images={c.parity_images}",
            f"--benchmark_runs={c.benchmark_runs}",
        )

    def edge(self):
        """Runs the exported models with the TensorFlow-free runner, on image files."""
        images = self.write_edge_images()
        export_dir = self.path("export")
        for name in ("model_fp32.tflite", "model_int8.tflite", "model_int8_mixed.tflite"):
            model = export_dir / name
            if not model.exists():
                raise RunError(f"The export stage wrote no {model}.")
            stem = model.stem
            labels = f"--labels={export_dir / 'labels.txt'}"
            runner = [sys.executable, str(REPO / "edge" / "run_tflite.py"), f"--model={model}"]
            self.run_captured(f"edge:{stem}", runner + [labels, "--json", *images], f"{stem}.json")
            self.run_captured(
                f"edge-benchmark:{stem}",
                runner
                + ["--benchmark", "--json", "--threads=2", f"--runs={self.config.benchmark_runs}"],
                f"{stem}_benchmark.json",
            )

    def run_captured(self, stage, command, output_name):
        shown = " ".join(shlex.quote(part) for part in command[1:])
        print(f"\n=== [{stage}] python {shown}", flush=True)
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stderr)
            raise RunError(f"The {stage} stage failed (exit {result.returncode}).")
        print(result.stdout.strip())
        out = self.path("edge", output_name)
        out.write_text(result.stdout)

    def write_edge_images(self):
        """Saves a few test images as PNG files, the way a device would receive them."""
        from PIL import Image

        from pibconv_tf import data

        source = data.load_source(self.config.dataset, self.config.data_dir, seed=self.config.seed)
        images, labels = source.numpy("test", limit=self.config.edge_images)
        directory = self.path("edge")
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = source.info.class_names[int(label)]
            path = directory / f"test_{index}_label_{name}.png"
            Image.fromarray(np.asarray(image, np.uint8)).save(path)
            paths.append(str(path))
        return paths

    def pictures(self):
        self.app(
            "gradcam",
            "apps.gradcam",
            *self.data_flags(),
            f"--model={self.path('train')}",
            f"--indices={','.join(str(i) for i in range(6))}",
            f"--output={self.path('figures', 'gradcam.png')}",
        )
        self.app(
            "plot",
            "apps.plot",
            f"--search_dir={self.path('search')}",
            f"--output_dir={self.path('figures')}",
        )


STAGES = ("search", "train", "evaluate", "export", "edge", "pictures")


def run_pipeline(config):
    """Runs every stage; returns the summary dict (also written as `summary.json`)."""
    config.validate()
    RunDir.prepare(config.output_dir, resume=False, overwrite=config.overwrite)
    pipeline = Pipeline(config)
    (pipeline.root / "config.json").write_text(
        json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    )
    start = time.perf_counter()
    for stage in STAGES:
        getattr(pipeline, stage)()
    summary = summarize(pipeline.root)
    summary["stage_seconds"] = pipeline.stage_seconds
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    (pipeline.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + format_summary(summary))
    return summary


def _read_json(path):
    path = pathlib.Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def summarize(root):
    """Collects the headline results of a finished pipeline directory."""
    root = pathlib.Path(root)
    evaluation = _read_json(root / "evaluate.json") or {}
    artifacts = sorted(
        str(path)
        for path in root.rglob("*")
        if path.is_file()
        and "checkpoints" not in path.parts
        and "tensorboard" not in path.parts
        and "variables" not in path.parts
    )
    edge = {}
    for path in sorted((root / "edge").glob("*_benchmark.json")):
        edge[path.stem.replace("_benchmark", "")] = json.loads(path.read_text())
    tflite_sizes = {
        path.name: path.stat().st_size for path in sorted((root / "export").glob("*.tflite"))
    }
    return {
        "genotype": _read_json(root / "search" / "genotype.json"),
        "evaluation": evaluation,
        "parity": _read_json(root / "export" / "parity.json"),
        "tflite_bytes": tflite_sizes,
        "edge_latency": edge,
        "artifacts": artifacts,
    }


def format_summary(summary):
    lines = ["=== Summary"]
    genotype = summary.get("genotype") or {}
    for cell in ("normal", "reduce"):
        if cell in genotype:
            edges = ", ".join(f"{op}<-{index}" for op, index in genotype[cell])
            lines.append(f"{cell} cell: {edges}")
    ev = summary.get("evaluation") or {}
    if ev:
        lines.append(
            "test top-1 {:.2%}, top-5 {:.2%} on {} images; {:,} params, {:.4f} GMACs".format(
                ev.get("top1", float("nan")),
                ev.get("top5", float("nan")),
                ev.get("num_images", 0),
                ev.get("params", 0),
                ev.get("gmacs", float("nan")),
            )
        )
    for name, size in summary.get("tflite_bytes", {}).items():
        latency = summary.get("edge_latency", {}).get(pathlib.Path(name).stem, {})
        timing = (
            f", batch-1 latency median {latency['median_ms']:.3f} ms / p90 "
            f"{latency['p90_ms']:.3f} ms ({latency.get('threads')} threads)"
            if latency
            else ""
        )
        lines.append(f"{name}: {size / 1024:.1f} KiB{timing}")
    seconds = summary.get("total_seconds")
    if seconds is not None:
        lines.append(f"total {seconds:.0f} s; stages {summary.get('stage_seconds')}")
    lines.append("artifacts:")
    lines.extend(f"  {path}" for path in summary.get("artifacts", []))
    return "\n".join(lines)
