"""The whole job end to end: search -> train -> evaluate -> export -> edge run -> pictures.

Each stage calls the library function behind one of the apps (the equivalent command is
printed first, so the demo doubles as a worked example of every app), in this process: it
works from an installed package as from a checkout. The stages write into one directory; a
failed stage stops the demo with its name.
"""

import contextlib
import dataclasses
import io
import json
import pathlib
import time

import keras
import numpy as np

from pibconv_tf import evaluation, runs
from pibconv_tf.errors import RunError, UserInputError
from pibconv_tf.runs import RunDir


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of the end-to-end run (defaults: the embedded digits, a few minutes on 2 cores)."""

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

    def validate(self):
        positive = [f.name for f in dataclasses.fields(self) if f.type is int and f.name != "seed"]
        for name in positive:
            minimum = 0 if name.endswith("steps_per_epoch") else 1
            if getattr(self, name) < minimum:
                raise UserInputError(f"--{name} must be >= {minimum}, got {getattr(self, name)}.")


EDGE_MODELS = ("model_fp32.tflite", "model_int8.tflite", "model_int8_mixed.tflite")


class Pipeline:
    """Runs the stages in order into `config.output_dir`, printing each equivalent command."""

    def __init__(self, config):
        self.config = config
        self.root = pathlib.Path(config.output_dir)
        self.stage_seconds = {}

    def path(self, *parts):
        return self.root.joinpath(*parts)

    @contextlib.contextmanager
    def stage(self, name, command):
        print(f"\n=== [{name}] python -m {command}", flush=True)
        start = time.perf_counter()
        try:
            yield
        except (UserInputError, RunError) as error:
            message = f"The {name} stage failed: {error} (its files are in {self.root})."
            raise RunError(message) from error
        finally:
            self.stage_seconds[name] = round(time.perf_counter() - start, 1)
            keras.backend.clear_session()  # the next stage builds other networks

    def data_args(self):
        c = self.config
        args = f"--dataset={c.dataset} --seed={c.seed}"
        return args + (f" --data_dir={c.data_dir}" if c.data_dir else "")

    def search(self):
        from pibconv_tf.search import run as search_run  # noqa: PLC0415 (TensorFlow)
        from pibconv_tf.search.config import SearchConfig  # noqa: PLC0415

        c = self.config
        config = SearchConfig(
            model_dir=str(self.path("search")),
            dataset=c.dataset,
            data_dir=c.data_dir,
            seed=c.seed,
            search_space=c.search_space,
            epochs=c.search_epochs,
            layers=c.search_layers,
            init_channels=c.search_channels,
            batch_size=c.search_batch_size,
            steps_per_epoch=c.search_steps_per_epoch,
            verbose=c.verbose,
        )
        command = (
            f"apps.search {self.data_args()} --model_dir={config.model_dir} "
            f"--search_space={c.search_space} --epochs={c.search_epochs} "
            f"--layers={c.search_layers} --init_channels={c.search_channels} "
            f"--batch_size={c.search_batch_size} --steps_per_epoch={c.search_steps_per_epoch}"
        )
        with self.stage("search", command):
            search_run.run_search(config)

    def train(self):
        from pibconv_tf.train import run as train_run  # noqa: PLC0415 (TensorFlow)

        c = self.config
        config = train_run.TrainConfig(
            genotype=str(self.path("search", runs.GENOTYPE)),
            model_dir=str(self.path("train")),
            dataset=c.dataset,
            data_dir=c.data_dir,
            seed=c.seed,
            layers=c.train_layers,
            init_channels=c.train_channels,
            epochs=c.train_epochs,
            batch_size=c.train_batch_size,
            steps_per_epoch=c.train_steps_per_epoch,
            verbose=c.verbose,
        )
        command = (
            f"apps.train {self.data_args()} --genotype={config.genotype} "
            f"--model_dir={config.model_dir} --layers={c.train_layers} "
            f"--init_channels={c.train_channels} --epochs={c.train_epochs} "
            f"--batch_size={c.train_batch_size} --steps_per_epoch={c.train_steps_per_epoch}"
        )
        with self.stage("train", command):
            train_run.train(config)

    def evaluate(self):
        c = self.config
        config = evaluation.EvaluateConfig(
            model=str(self.path("train", runs.MODEL)),
            dataset=c.dataset,
            data_dir=c.data_dir,
            seed=c.seed,
            output=str(self.path("evaluate.json")),
        )
        command = (
            f"apps.evaluate {self.data_args()} --model={config.model} --output={config.output}"
        )
        with self.stage("evaluate", command):
            print(json.dumps(evaluation.evaluate_file(config), indent=2, sort_keys=True))

    def export(self):
        from pibconv_tf.deploy import export, tflite  # noqa: PLC0415 (TensorFlow)

        c = self.config
        formats = ("saved_model", "tflite_fp32", "tflite_int8", "tflite_int8_mixed")
        config = export.ExportConfig(
            model=str(self.path("train", runs.MODEL)),
            output_dir=str(self.path("export")),
            formats=formats,
            dataset=c.dataset,
            data_dir=c.data_dir,
            seed=c.seed,
            calibration_images=c.calibration_images,
            parity_images=c.parity_images,
            benchmark_runs=c.benchmark_runs,
        )
        command = (
            f"apps.export {self.data_args()} --model={config.model} "
            f"--output_dir={config.output_dir} --formats={','.join(formats)} "
            f"--calibration_images={c.calibration_images} --parity_images={c.parity_images} "
            f"--benchmark_runs={c.benchmark_runs}"
        )
        with self.stage("export", command):
            report = export.export_model(config)
            print(tflite.format_parity(report))
            if "latency" in report:
                print(tflite.format_latency(report["latency"]))

    def edge(self):
        """Runs the exported models with the TensorFlow-free runner, on image files."""
        from edge import run_tflite  # noqa: PLC0415

        images = self.write_edge_images()
        export_dir = self.path("export")
        for name in EDGE_MODELS:
            model = export_dir / name
            if not model.exists():
                raise RunError(f"The export stage wrote no {model}.")
            labels = export_dir / "labels.txt"
            for mode, extra, output in (
                ("classify", [f"--labels={labels}", *images], f"{model.stem}.json"),
                (
                    "benchmark",
                    ["--benchmark", "--threads=2", f"--runs={self.config.benchmark_runs}"],
                    f"{model.stem}_benchmark.json",
                ),
            ):
                args = [f"--model={model}", "--json", *extra]
                with self.stage(f"edge-{mode}:{model.stem}", f"edge.run_tflite {' '.join(args)}"):
                    stdout = io.StringIO()
                    with contextlib.redirect_stdout(stdout):
                        status = run_tflite.main(args)
                    if status != 0:
                        raise RunError(f"the edge runner exited with status {status}")
                    print(stdout.getvalue().strip())
                    self.path("edge", output).write_text(stdout.getvalue())

    def write_edge_images(self):
        """Saves a few test images as PNG files, the way a device would receive them."""
        from PIL import Image  # noqa: PLC0415

        from pibconv_tf import data  # noqa: PLC0415

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
        from pibconv_tf.insight import gradcam, plots  # noqa: PLC0415

        c = self.config
        indices = list(range(6))
        config = gradcam.GradcamConfig(
            models=[str(self.path("train"))],
            output=str(self.path("figures", "gradcam.png")),
            dataset=c.dataset,
            data_dir=c.data_dir,
            seed=c.seed,
            indices=indices,
        )
        command = (
            f"apps.gradcam {self.data_args()} --model={config.models[0]} "
            f"--indices={','.join(map(str, indices))} --output={config.output}"
        )
        with self.stage("gradcam", command):
            gradcam.run_gradcam(config)
        figures = plots.PlotConfig(
            output_dir=str(self.path("figures")), search_dir=str(self.path("search"))
        )
        command = f"apps.plot --search_dir={figures.search_dir} --output_dir={figures.output_dir}"
        with self.stage("plot", command):
            plots.make_figures(figures)


STAGES = ("search", "train", "evaluate", "export", "edge", "pictures")


def run_pipeline(config):
    """Runs every stage; returns the summary dict (also written as `summary.json`)."""
    config.validate()
    RunDir.prepare(config.output_dir, resume=False, overwrite=config.overwrite)
    pipeline = Pipeline(config)
    (pipeline.root / runs.CONFIG).write_text(
        json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    )
    start = time.perf_counter()
    for stage in STAGES:
        getattr(pipeline, stage)()
    summary = summarize(pipeline.root)
    summary["runtime"] = runtime_settings()
    summary["stage_seconds"] = pipeline.stage_seconds
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    (pipeline.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + format_summary(summary))
    return summary


def runtime_settings():
    """The thread pools, graph optimiser and CPU kernels the stages ran with."""
    import tensorflow as tf  # noqa: PLC0415

    from pibconv_tf.model import acceleration  # noqa: PLC0415

    threading = tf.config.threading
    return {
        "intra_op_threads": threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": threading.get_inter_op_parallelism_threads(),
        "cpu_kernels": acceleration.enabled(),
    }


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
        and runs.CHECKPOINT_DIR not in path.parts
        and runs.TENSORBOARD not in path.parts
        and "variables" not in path.parts
    )
    edge = {}
    for path in sorted((root / "edge").glob("*_benchmark.json")):
        edge[path.stem.replace("_benchmark", "")] = json.loads(path.read_text())
    tflite_sizes = {
        path.name: path.stat().st_size for path in sorted((root / "export").glob("*.tflite"))
    }
    return {
        "genotype": _read_json(root / "search" / runs.GENOTYPE),
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
