"""The paper's Table 1: one genotype trained at several layer counts, one after another.

Each layer count trains in `model_dir/layers_{n}` with `training.train`; after each row
`table.md` and `table.csv` are rewritten with the rows finished so far (genotype, layers,
final and best test top-1, parameters in millions, GMACs). A finished row (its
`result.json` covers the configured epochs) is never retrained; an interrupted row resumes
from its last checkpoint.

Example:
```python
config = TrainConfig(genotype="PIBCONV", dataset="digits", epochs=20, model_dir="runs/sweep")
rows = run_sweep(config, layer_counts=[2, 3, 4, 5])
```
"""

import csv
import dataclasses
import io
import json
import os
import shutil

from pibconv_tf import evaluation, runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import complexity
from pibconv_tf.runs import CONFIG, RunDir, has_checkpoint, write_text_atomic
from pibconv_tf.train import config as train_config
from pibconv_tf.train import run as training

TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
COLUMNS = (
    "genotype",
    "layers",
    "test_accuracy",
    "best_test_accuracy",
    "params_m",
    "gmacs",
    "epochs",
    "model",
)


def row_dir(model_dir, layers):
    return os.path.join(model_dir, f"layers_{layers}")


def check_layer_counts(layer_counts):
    counts = list(layer_counts)
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise UserInputError(f"--layers must list counts >= 1, got {counts}.")
    if len(set(counts)) != len(counts):
        raise UserInputError(f"--layers lists a count twice: {counts}.")
    return counts


def sweep_config_dict(config, layer_counts):
    """The sweep's `config.json`: the training flags with `layers` as a list."""
    return {**config.to_dict(), "layers": list(layer_counts)}


def resumed_sweep(model_dir, overrides):
    """(TrainConfig, layer counts) stored in a sweep directory, updated with `overrides`."""
    path = os.path.join(model_dir or "", CONFIG)
    if not model_dir or not os.path.isfile(path):
        raise UserInputError(
            f"--resume was given but --model_dir {model_dir!r} holds no {CONFIG} of a sweep."
        )
    with open(path) as stream:
        stored = {**json.load(stream), **overrides, "resume": True, "overwrite": False}
    layer_counts = stored.pop("layers")
    if not isinstance(layer_counts, list):
        raise UserInputError(f"{path!r} is not the config.json of a sweep (no layers list).")
    return train_config.TrainConfig.from_dict({**stored, "layers": layer_counts[0]}), layer_counts


def prepare_sweep_dir(path, resume, overwrite):
    """Like `RunDir.prepare`, but a sweep resumes from its `config.json`, not a checkpoint."""
    if not path:
        raise UserInputError("--model_dir is required: where the sweep writes its outputs.")
    if resume and overwrite:
        raise UserInputError("--resume and --overwrite contradict each other; pass one.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"--model_dir {path!r} exists and is not a directory.")
    non_empty = os.path.isdir(path) and bool(os.listdir(path))
    if resume:
        if not os.path.isfile(os.path.join(path, CONFIG)):
            raise UserInputError(f"--resume was given but {path!r} holds no sweep to resume.")
    elif non_empty and not overwrite:
        raise UserInputError(
            f"--model_dir {path!r} is not empty; pass --resume to continue that sweep "
            "or --overwrite to replace it."
        )
    elif non_empty:
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    return RunDir(path, resumed=resume)


def run_sweep(config, layer_counts):
    """Trains `config` at each of `layer_counts` in `config.model_dir/layers_{n}`.

    `config.model_dir`, `config.resume` and `config.overwrite` apply to the sweep
    directory; `config.layers` is ignored. Rows run in the given order.

    Returns:
        The table rows (dicts with `COLUMNS`), also written as `table.md` and `table.csv`.
    """
    layer_counts = check_layer_counts(layer_counts)
    for layers in layer_counts:  # every row's config is valid before anything runs
        dataclasses.replace(config, layers=layers).validate()
    training.check_inputs(dataclasses.replace(config, layers=layer_counts[0]))
    sweep_dir = prepare_sweep_dir(config.model_dir, config.resume, config.overwrite)
    if config.resume:
        _check_resume(sweep_dir, config)
    sweep_dir.write_json(CONFIG, sweep_config_dict(config, layer_counts))
    rows = []
    for layers in layer_counts:
        result = _run_row(config, layers)
        rows.append(table_row(config.genotype, layers, result))
        write_table(sweep_dir, rows)
    return rows


def _check_resume(sweep_dir, config):
    """Refuses to continue a sweep with another genotype or run-defining setting."""
    stored = sweep_dir.read_json(CONFIG)
    for name in ("genotype", *train_config.FIXED_ON_RESUME):
        if name != "layers" and stored.get(name) != getattr(config, name):
            raise UserInputError(
                f"--{name}={getattr(config, name)!r} differs from the sweep being resumed in "
                f"{str(sweep_dir.path)!r} ({stored.get(name)!r}); resume with the same value."
            )


def _log(config, message):
    if config.verbose:
        print(message, flush=True)


def _run_row(config, layers):
    path = row_dir(config.model_dir, layers)
    row = dataclasses.replace(config, layers=layers)
    return train_or_resume(row, path, lambda message: _log(config, f"layers={layers}: {message}"))


def train_or_resume(config, path, log=print):
    """Trains `config` in `path`; a finished run there is reused, an interrupted one resumed.

    Args:
        config: a `TrainConfig` (its model_dir, resume and overwrite are set here).
        path: the run directory.
        log: callable(message) for one line about what happens.

    Returns:
        The run's `result.json` summary.
    """
    result = _finished(path, config.epochs)
    if result is not None:
        log(f"finished earlier, not retrained ({path}).")
        return result
    resume = has_checkpoint(path)
    overwrite = not resume and os.path.isdir(path) and bool(os.listdir(path))
    log(f"{'resuming' if resume else 'training'} in {path}.")
    run = dataclasses.replace(config, model_dir=path, resume=resume, overwrite=overwrite)
    return training.train(run)


def _finished(path, epochs):
    result_path = os.path.join(path, runs.RESULT)
    if not os.path.isfile(result_path):
        return None
    with open(result_path) as stream:
        result = json.load(stream)
    return result if result.get("epochs", 0) >= epochs else None


def table_row(genotype, layers, result):
    """One Table 1 row from a run's `result.json` and its model's complexity."""
    model = evaluation.load_model(result["model"])
    counts = complexity.model_complexity(model)
    return {
        "genotype": genotype,
        "layers": layers,
        "test_accuracy": round(100 * result["test_accuracy"], 2),
        "best_test_accuracy": round(100 * result.get("best_test_accuracy", 0.0), 2),
        "params_m": round(counts["params"] / 1e6, 4),
        "gmacs": round(counts["gmacs"], 4),
        "epochs": result["epochs"],
        "model": result["model"],
    }


def format_markdown(rows):
    lines = [
        "| Genotype | Eval. Layers | Test Acc. (%) | Best Test Acc. (%) | Params (M) | GMAC "
        "| Epochs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['genotype']} | {row['layers']} | {row['test_accuracy']:.2f} | "
            f"{row['best_test_accuracy']:.2f} | {row['params_m']:.3f} | {row['gmacs']:.3f} | "
            f"{row['epochs']} |"
        )
    return "\n".join(lines) + "\n"


def format_csv(rows):
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def write_table(sweep_dir, rows):
    write_text_atomic(sweep_dir.file(TABLE_MD), format_markdown(rows))
    write_text_atomic(sweep_dir.file(TABLE_CSV), format_csv(rows))
