"""DARTS' seed protocol: one search per seed, the genotype with the best validation accuracy.

DARTS results vary with the seed (Liu et al., 2019, Sec. 3.3, ran the search four times and
kept the cell that validated best). `run_seeds` runs `SearchConfig` once per seed, each in
`model_dir/seed_<s>/` (a finished search is kept, an interrupted one resumes, so the whole
protocol resumes where it stopped), then writes in `model_dir`:

- `seeds.json`: the seeds, each one's genotype, final validation accuracy and epochs, how
  often each operation was chosen (normal and reduction cells), and the selected seed;
- `seeds.md`: the same as a table;
- `genotype.json`: the selected genotype (the one `apps.train --genotype=DIR` reads);
- `config.json`: the shared settings, so that `--resume --model_dir=DIR` alone continues.
"""

import collections
import dataclasses
import pathlib

from pibconv_tf import runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.search.run import run_search

SUMMARY = "seeds.json"
TABLE = "seeds.md"


def seed_dir(model_dir, seed):
    return pathlib.Path(model_dir) / f"seed_{seed}"


def check_seeds(seeds):
    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise UserInputError(f"--seeds must list integers >= 0, got {list(seeds)}.")
    if len(set(seeds)) != len(seeds):
        raise UserInputError(f"--seeds lists a seed twice: {list(seeds)}.")
    return seeds


def stored_seeds(model_dir):
    """The seeds of the protocol in `model_dir`, or None when it holds a single search."""
    path = pathlib.Path(model_dir) / SUMMARY
    if not path.exists():
        return None
    return tuple(runs.RunDir(model_dir).read_json(SUMMARY)["seeds"])


def run_seeds(config, seeds):
    """Runs (or resumes) the search of `config` once per seed; returns the summary.

    `config.resume` continues the protocol in `config.model_dir`; `config.overwrite`
    starts it over. Every search shares `config`'s settings but its seed and directory.
    """
    seeds = check_seeds(seeds)
    config.validate()
    if config.resume:
        top = _resumed(config, seeds)
    else:
        top = runs.RunDir.prepare(config.model_dir, False, config.overwrite)
        # `--resume --model_dir=DIR` alone continues the protocol from these two files.
        top.write_json(runs.CONFIG, {**config.to_dict(), "seed": seeds[0]})
        top.write_json(SUMMARY, {"seeds": list(seeds), "runs": []})
    try:
        rows = []
        for index, seed in enumerate(seeds):
            path = seed_dir(config.model_dir, seed)
            print(f"=== [{index + 1}/{len(seeds)}] search with seed {seed}: {path}", flush=True)
            resume = runs.has_checkpoint(path)
            single = dataclasses.replace(
                config, model_dir=str(path), seed=seed, resume=resume, overwrite=not resume
            )
            genotype = run_search(single)
            rows.append(_row(path, seed, genotype))
        summary = summarize(seeds, rows)
        top.write_json(SUMMARY, summary)
        runs.write_text_atomic(top.file(TABLE), format_markdown(summary))
        selected = next(row for row in rows if row["seed"] == summary["selected_seed"])
        top.write_json(runs.GENOTYPE, selected["genotype"])
        return summary
    finally:
        top.release()


def _resumed(config, seeds):
    stored = stored_seeds(config.model_dir)
    if stored is None:
        raise UserInputError(
            f"--resume with --seeds, but {config.model_dir!r} holds no seed protocol ({SUMMARY})."
        )
    if stored != seeds:
        raise UserInputError(
            f"--seeds={','.join(map(str, seeds))} differs from the protocol being resumed "
            f"({','.join(map(str, stored))})."
        )
    run = runs.RunDir(config.model_dir, resumed=True)
    run._lock = runs.RunLock.acquire(config.model_dir)
    return run


def _row(path, seed, genotype):
    metrics = runs.RunDir(path).read_jsonl(runs.METRICS)
    last = metrics[-1] if metrics else {}
    return {
        "seed": seed,
        "model_dir": str(path),
        "genotype": genotype.to_dict(),
        "val_accuracy": last.get("val_accuracy"),
        "epochs": last.get("epoch", 0),
    }


def summarize(seeds, rows):
    """The protocol's summary: rows, operation counts and the best seed by validation."""
    counts = {"normal": collections.Counter(), "reduce": collections.Counter()}
    for row in rows:
        for kind in counts:
            counts[kind].update(op for op, _ in row["genotype"][kind])
    best = max(rows, key=lambda row: (row["val_accuracy"] or 0.0, -row["seed"]))
    return {
        "seeds": list(seeds),
        "runs": rows,
        "operation_counts": {kind: dict(c.most_common()) for kind, c in counts.items()},
        "selected_seed": best["seed"],
        "selection": "the best final validation accuracy of the search (ties: lower seed)",
    }


def format_markdown(summary):
    lines = [
        "| seed | validation top-1 (%) | epochs | normal cell | reduction cell |",
        "|---:|---:|---:|---|---|",
    ]
    for row in summary["runs"]:
        cells = [
            ", ".join(f"{op}({i})" for op, i in row["genotype"][kind])
            for kind in ("normal", "reduce")
        ]
        accuracy = row["val_accuracy"]
        shown = "-" if accuracy is None else f"{100 * accuracy:.2f}"
        mark = " (selected)" if row["seed"] == summary["selected_seed"] else ""
        lines.append(
            f"| {row['seed']}{mark} | {shown} | {row['epochs']} | {cells[0]} | {cells[1]} |"
        )
    lines += ["", "Operations chosen, over every seed:", ""]
    for kind, counts in summary["operation_counts"].items():
        listed = ", ".join(f"{op} x{n}" for op, n in counts.items())
        lines.append(f"- {kind}: {listed}")
    return "\n".join(lines) + "\n"
