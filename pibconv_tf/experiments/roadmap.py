"""The paper's incremental experiment (its contribution C1, Fig. 1) as one resumable run.

For each stage of the roadmap, a search space (darts -> darts_gelu -> darts_gelu_ln ->
convnext -> pibconv by default; `pibconv_f<F>` sets PIBConv's bottleneck ratio F, the
paper's other knob), and for each seed: search (`search.run.run_search`) -> the derived
genotype -> train it at the given depth (`training.train`) -> its test top-1, parameters and
GMACs. After every run `roadmap_runs.csv` (one row per stage and seed), `roadmap.csv` and
`roadmap.md` (one row per stage: mean and spread over the seeds, the genotype of the seed
with the best search validation accuracy, as DARTS selects) and `roadmap.png` (Fig. 1's
accuracy per stage, with parameters and GMACs) are rewritten.

Every run has its own directory, `output_dir/<stage>/seed_<s>/{search,train}`: a finished
one is never run again, an interrupted one resumes from its last checkpoint, so an
interrupted roadmap continues at the stage and epoch where it stopped.

Example:
```python
config = RoadmapConfig(output_dir="runs/roadmap", search=SearchConfig(dataset="digits", ...),
                       train=TrainConfig(dataset="digits", layers=2, ...))
rows = run_roadmap(config)
```

Reference:
    Ahmadian et al., arXiv 2301.01286, Sec. 2 and Fig. 1.
"""

import csv
import dataclasses
import io
import json
import os
import statistics

import keras

from pibconv_tf import evaluation, runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.experiments import sweep
from pibconv_tf.model import complexity, search_spaces
from pibconv_tf.runs import CONFIG, has_checkpoint, write_text_atomic
from pibconv_tf.search import run as search_run
from pibconv_tf.search import seeds as seed_protocol
from pibconv_tf.search.config import SearchConfig
from pibconv_tf.train import config as train_config
from pibconv_tf.train import run as training

STAGES = ("darts", "darts_gelu", "darts_gelu_ln", "convnext", "pibconv")
RUNS_CSV = "roadmap_runs.csv"
TABLE_CSV = "roadmap.csv"
TABLE_MD = "roadmap.md"
FIGURE = "roadmap.png"
RUN_COLUMNS = (
    "stage",
    "search_space",
    "seed",
    "genotype",
    "search_val_accuracy",
    "test_accuracy",
    "params_m",
    "gmacs",
    "search_seconds",
    "train_seconds",
)
STAGE_COLUMNS = (
    "stage",
    "search_space",
    "seeds",
    "test_accuracy",
    "test_accuracy_std",
    "selected_seed",
    "genotype",
    "params_m",
    "gmacs",
    "search_seconds",
    "train_seconds",
)
# Settings of the templates that each run sets itself.
_PER_RUN = ("model_dir", "resume", "overwrite", "seed", "search_space", "genotype")
# Settings that a resumed roadmap may change (they do not change what a run computes).
_MAY_CHANGE = frozenset({"verbose", "data_dir", "stop_after_epoch", "run_eagerly"})


@dataclasses.dataclass
class RoadmapConfig:
    """Settings of `run_roadmap`; written as `config.json` into `output_dir`.

    Args:
        output_dir: the roadmap's directory.
        stages: search spaces in roadmap order (`ops.get_search_space` names).
        seeds: each stage is searched and trained once per seed.
        search: the search settings (`SearchConfig`; model_dir, seed, search_space and
            resume are set per run).
        train: the training settings (`TrainConfig`; model_dir, seed, genotype and resume
            are set per run).
        resume: continue the roadmap in `output_dir`; overwrite: replace it.
        verbose: print a line per run.
    """

    output_dir: str | None = None
    stages: tuple[str, ...] = STAGES
    seeds: tuple[int, ...] = (0,)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    train: train_config.TrainConfig = dataclasses.field(default_factory=train_config.TrainConfig)
    resume: bool = False
    overwrite: bool = False
    verbose: int = 1

    def validate(self):
        """Raises UserInputError with one sentence for the first bad setting."""
        self.stages, self.seeds = tuple(self.stages), tuple(self.seeds)
        if not self.stages:
            raise UserInputError("--stages is empty; name at least one search space.")
        for stage in self.stages:
            if not search_spaces.is_search_space(stage):
                raise UserInputError(
                    f"--stages lists {stage!r}, which is not a search space; expected names "
                    f"from {', '.join(search_spaces.SEARCH_SPACES)} (or pibconv_f<F>)."
                )
        if len(set(self.stages)) != len(self.stages):
            raise UserInputError(f"--stages lists a stage twice: {','.join(self.stages)}.")
        seed_protocol.check_seeds(self.seeds)
        dataclasses.replace(self.search, model_dir=self.output_dir or "-").validate()
        self.train.validate()
        return self

    def to_dict(self):
        return {
            "output_dir": self.output_dir,
            "stages": list(self.stages),
            "seeds": list(self.seeds),
            "search": _template(self.search.to_dict()),
            "train": _template(self.train.to_dict()),
        }


def _template(values):
    return {k: v for k, v in values.items() if k not in _PER_RUN}


def run_dir(output_dir, stage, seed, kind):
    """`output_dir/<stage>/seed_<seed>/<kind>` (kind: "search" or "train")."""
    return os.path.join(output_dir, stage, f"seed_{seed}", kind)


def run_roadmap(config):
    """Runs (or resumes) every stage and seed of `config`; returns the per-stage rows.

    Raises:
        UserInputError: a bad setting or an unusable `output_dir`, before anything runs.
    """
    config.validate()
    training.check_inputs(dataclasses.replace(config.train, genotype="PIBCONV"))
    roadmap_dir = sweep.prepare_sweep_dir(config.output_dir, config.resume, config.overwrite)
    if config.resume:
        _check_resume(roadmap_dir.read_json(CONFIG), config.to_dict())
    roadmap_dir.write_json(CONFIG, config.to_dict())
    runs = []
    total = len(config.stages) * len(config.seeds)
    for stage in config.stages:
        for seed in config.seeds:
            _log(config, f"[{len(runs) + 1}/{total}] stage {stage}, seed {seed}")
            runs.append(_stage_run(config, stage, seed))
            keras.backend.clear_session()  # the next stage builds other networks
            write_tables(roadmap_dir.path, runs, config.stages)
    return stage_rows(runs, config.stages)


def _log(config, message):
    if config.verbose:
        print(message, flush=True)


def _check_resume(stored, given):
    for part in ("search", "train"):
        for name, value in given[part].items():
            if name in _MAY_CHANGE or stored.get(part, {}).get(name) == value:
                continue
            raise UserInputError(
                f"The {part} setting {name}={value!r} differs from the roadmap being resumed "
                f"({stored.get(part, {}).get(name)!r}); resume with the same value."
            )


def _search(config, stage, seed):
    path = run_dir(config.output_dir, stage, seed, "search")
    genotype_path = os.path.join(path, runs.GENOTYPE)
    if os.path.isfile(genotype_path):
        _log(config, f"  search: finished earlier ({path})")
        return genotype_path
    resume = has_checkpoint(path)
    overwrite = not resume and os.path.isdir(path) and bool(os.listdir(path))
    _log(config, f"  search: {'resuming' if resume else 'searching'} in {path}")
    search = dataclasses.replace(
        config.search,
        model_dir=path,
        search_space=stage,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        stop_after_epoch=None,
    )
    search_run.run_search(search)
    return genotype_path


def _stage_run(config, stage, seed):
    genotype_path = _search(config, stage, seed)
    path = run_dir(config.output_dir, stage, seed, "train")
    train = dataclasses.replace(config.train, genotype=genotype_path, seed=seed)
    result = sweep.train_or_resume(train, path, lambda message: _log(config, f"  train: {message}"))
    counts = complexity.model_complexity(evaluation.load_model(result["model"]))
    search_dir = os.path.dirname(genotype_path)
    search_metrics = _records(os.path.join(search_dir, runs.METRICS))
    with open(genotype_path) as stream:
        genotype = json.dumps(json.load(stream), separators=(",", ":"))
    return {
        "stage": stage,
        "search_space": stage,
        "seed": seed,
        "genotype": genotype,
        "search_val_accuracy": round(100 * search_metrics[-1].get("val_accuracy", 0.0), 2),
        "test_accuracy": round(100 * result["test_accuracy"], 2),
        "params_m": _significant(counts["params"] / 1e6),
        "gmacs": _significant(counts["gmacs"]),
        "search_seconds": _seconds(search_metrics),
        "train_seconds": _seconds(_records(os.path.join(path, runs.METRICS))),
    }


def _significant(value, digits=4):
    return float(f"{value:.{digits}g}")


def _records(path):
    if not os.path.isfile(path):
        return [{}]
    with open(path) as stream:
        return [json.loads(line) for line in stream if line.strip()] or [{}]


def _seconds(records):
    return round(sum(record.get("seconds", 0.0) for record in records), 1)


def stage_rows(runs, stages):
    """One row per stage: the mean and spread of test top-1 over its seeds, and the
    genotype (with its parameters and GMACs) of the seed with the best search validation
    accuracy."""
    rows = []
    for stage in stages:
        mine = [run for run in runs if run["stage"] == stage]
        if not mine:
            continue
        accuracy = [run["test_accuracy"] for run in mine]
        selected = max(mine, key=lambda run: run["search_val_accuracy"])
        rows.append(
            {
                "stage": stage,
                "search_space": stage,
                "seeds": len(mine),
                "test_accuracy": round(statistics.fmean(accuracy), 2),
                "test_accuracy_std": round(statistics.pstdev(accuracy), 2),
                "selected_seed": selected["seed"],
                "genotype": selected["genotype"],
                "params_m": selected["params_m"],
                "gmacs": selected["gmacs"],
                "search_seconds": round(statistics.fmean(r["search_seconds"] for r in mine), 1),
                "train_seconds": round(statistics.fmean(r["train_seconds"] for r in mine), 1),
            }
        )
    return rows


def _csv(rows, columns):
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def format_markdown(rows, runs):
    lines = [
        "| Stage | Seeds | Test top-1 (%) | Params (M) | GMACs | Search (s) | Training (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = f" ± {row['test_accuracy_std']:.2f}" if row["seeds"] > 1 else ""
        lines.append(
            f"| {row['stage']} | {row['seeds']} | {row['test_accuracy']:.2f}{spread} | "
            f"{row['params_m']:.4g} | {row['gmacs']:.4g} | {row['search_seconds']:.0f} | "
            f"{row['train_seconds']:.0f} |"
        )
    lines += ["", "Genotypes (the seed with the best search validation accuracy):", ""]
    lines += [
        f"- {row['stage']} (seed {row['selected_seed']}): `{row['genotype']}`" for row in rows
    ]
    if any(row["seeds"] > 1 for row in rows):
        lines += [
            "",
            "| Stage | Seed | Search val top-1 (%) | Test top-1 (%) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['stage']} | {r['seed']} | {r['search_val_accuracy']:.2f} | "
            f"{r['test_accuracy']:.2f} |"
            for r in runs
        ]
    return "\n".join(lines) + "\n"


def write_tables(path, runs, stages):
    """Rewrites the CSV and Markdown tables and the figure from the runs so far."""
    rows = stage_rows(runs, stages)
    write_text_atomic(os.path.join(path, RUNS_CSV), _csv(runs, RUN_COLUMNS))
    write_text_atomic(os.path.join(path, TABLE_CSV), _csv(rows, STAGE_COLUMNS))
    write_text_atomic(os.path.join(path, TABLE_MD), format_markdown(rows, runs))
    from pibconv_tf.insight import plots  # noqa: PLC0415 (matplotlib only when there is a figure)

    plots.save_figure(plots.plot_roadmap(rows), os.path.join(path, FIGURE))
    return rows
