"""Checkpoints of a run: every variable of its models, optimizers and metrics, by path.

One `.npz` file per checkpoint (`checkpoints/epoch-0003.npz`, or `epoch-0003-step-000120.npz`
for an interrupted epoch) holds {group/variable path: value}; `checkpoints/index.json` lists
them with their SHA-256, newest last. It is the same on every Keras backend: variables are
read and assigned through Keras, so a TensorFlow run and a JAX run write the same files.

Restoring checks, newest first, that a file is intact (its hash), readable and holds exactly
the variables of the run being built (names and shapes); a damaged file is reported in one
sentence and the next older one is taken; a file written for another network ends the
restore with one sentence. Nothing is changed on disk by a restore.

Why not TensorFlow's checkpoints: their object graph of a Keras 3 model holds only part of
its variables (16 of 104 in a 2-cell network: the BatchNorm statistics inside the cells'
operations were missing), they exist for TensorFlow only, and a truncated file ends the
restore in a traceback.
"""

import hashlib
import io
import json
import os
import pathlib
import re
import sys

import keras
import numpy as np

from pibconv_tf.errors import UserInputError

DIRECTORY = "checkpoints"
INDEX = "index.json"
_FILE = re.compile(r"^epoch-(?P<epoch>\d+)(?:-step-(?P<step>\d+))?\.npz$")
_META = "__meta__"


def group_variables(name, value):
    """{key: variable} of one group: a Keras layer, model, optimizer or metric (every
    variable, trainable or not, keyed by "name/path"), a dict or list of variables, or one
    variable (keyed by "name")."""
    if isinstance(value, (keras.layers.Layer, keras.optimizers.Optimizer, keras.metrics.Metric)):
        variables = list(value.variables)
        keys = [f"{name}/{variable.path}" for variable in variables]
    elif isinstance(value, dict):
        keys, variables = [f"{name}/{key}" for key in value], list(value.values())
    elif isinstance(value, (list, tuple)):
        keys, variables = [f"{name}/{index:04d}" for index in range(len(value))], list(value)
    else:
        keys, variables = [name], [value]
    if len(set(keys)) != len(keys):
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"Checkpoint group {name!r} holds several variables at {repeated}.")
    return dict(zip(keys, variables, strict=True))


def _value(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


class Checkpoints:
    """The checkpoints of one run directory.

    Args:
        run_dir: the run directory (checkpoints go to its `checkpoints/`).
        keep: how many checkpoints to keep (the newest).
        writer: whether this process writes them (False on the workers of a multi-worker
            run: the chief writes; reads need no collective, so workers write nothing).
        **groups: name -> what to save (see `group_variables`).

    Example:
    ```python
    checkpoints = Checkpoints(run_dir, network=network, optimizer=optimizer)
    entry = checkpoints.restore()  # None in a new run; {"epoch", "step", ...} on resume
    checkpoints.save(epoch=3)
    ```
    """

    def __init__(self, run_dir, keep=2, writer=True, **groups):
        self.directory = pathlib.Path(run_dir) / DIRECTORY
        self.keep = keep
        self.writer = writer
        self.variables = {}
        for name, value in groups.items():
            self.variables.update(group_variables(name, value))

    # ---------------------------------------------------------------- writing

    def save(self, epoch, step=0, meta=None):
        """Saves every variable as the checkpoint after `epoch` epochs (and `step` steps of
        the next one); returns its path (None on a process that does not write)."""
        if not self.writer:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "") + ".npz"
        info = {"epoch": int(epoch), "step": int(step), "meta": meta or {}}
        arrays = {key: _value(variable) for key, variable in self.variables.items()}
        arrays[_META] = np.asarray(json.dumps(info))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        content = buffer.getvalue()
        _write_atomic(self.directory / name, content)
        entries = [e for e in self._index_entries() if e["file"] != name]
        entries.append({"file": name, "sha256": hashlib.sha256(content).hexdigest(), **info})
        entries.sort(key=lambda e: (e["epoch"], e["step"]))
        stale, entries = entries[: -self.keep], entries[-self.keep :]
        _write_atomic(self.directory / INDEX, json.dumps({"checkpoints": entries}, indent=2))
        for entry in stale:
            path = self.directory / entry["file"]
            if path.exists():
                path.unlink()
        return str(self.directory / name)

    # ---------------------------------------------------------------- reading

    def _index_entries(self):
        path = self.directory / INDEX
        if not path.is_file():
            return []
        try:
            entries = json.loads(path.read_text())["checkpoints"]
            return [dict(e, epoch=int(e["epoch"]), step=int(e["step"])) for e in entries]
        except (ValueError, KeyError, TypeError, AttributeError):
            return []

    def entries(self):
        """The checkpoints on disk, newest first: the index's, or (with a damaged index)
        the files found by name."""
        indexed = self._index_entries()
        if indexed:
            return sorted(indexed, key=lambda e: (e["epoch"], e["step"]), reverse=True)
        found = []
        for path in self.directory.glob("epoch-*.npz") if self.directory.is_dir() else []:
            match = _FILE.match(path.name)
            if match:
                step = int(match["step"] or 0)
                found.append({"file": path.name, "epoch": int(match["epoch"]), "step": step})
        if found and (self.directory / INDEX).exists():
            _say(f"The checkpoint index {str(self.directory / INDEX)!r} is damaged; found "
                 f"{len(found)} checkpoint file(s) by name.")  # fmt: skip
        return sorted(found, key=lambda e: (e["epoch"], e["step"]), reverse=True)

    def exists(self):
        return bool(self.entries())

    def restore(self):
        """Assigns the newest intact checkpoint's values; returns its entry, or None when
        there is none. A damaged file is reported and skipped for the next older one.

        Raises:
            UserInputError: checkpoints exist but none is intact, or one holds other
                variables than this run's (another network or version), before any
                variable is assigned.
        """
        entries = self.entries()
        damaged = []
        for entry in entries:
            path = self.directory / entry["file"]
            try:
                arrays = self._read(path, entry.get("sha256"))
            except _DamagedError as error:
                damaged.append(f"{str(path)!r} ({error})")
                _say(f"Checkpoint {str(path)!r} is damaged ({error}); trying an older one.")
                continue
            self._check_matches(path, arrays)
            for key, variable in self.variables.items():
                dtype = keras.backend.standardize_dtype(variable.dtype)
                variable.assign(arrays[key].astype(dtype))
            info = json.loads(str(arrays[_META]))
            if damaged:
                _say(f"Resuming from {str(path)!r} instead.")
            return {**entry, **info, "path": str(path)}
        if damaged:
            raise UserInputError(
                f"No checkpoint in {str(self.directory)!r} restores: {'; '.join(damaged)}."
            )
        return None

    def _read(self, path, sha256):
        try:
            content = path.read_bytes()
        except OSError as error:
            raise _DamagedError(error.strerror or str(error)) from error
        if sha256 is not None and hashlib.sha256(content).hexdigest() != sha256:
            raise _DamagedError("its content is not what was written")
        try:
            with np.load(io.BytesIO(content), allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except Exception as error:  # zipfile/numpy raise several types for a bad archive
            raise _DamagedError(f"not a readable .npz archive: {type(error).__name__}") from error

    def _check_matches(self, path, arrays):
        stored = set(arrays) - {_META}
        expected = set(self.variables)
        if _META not in arrays or stored != expected:
            missing, extra = sorted(expected - stored), sorted(stored - expected)
            raise UserInputError(
                f"The checkpoint {str(path)!r} does not match the run being resumed "
                f"({len(missing)} of its variables are missing, e.g. {missing[:2]}, and "
                f"{len(extra)} are not the run's, e.g. {extra[:2]}): another network or "
                "version wrote it; resume it with that version, or start a new run."
            )
        for key, variable in self.variables.items():
            if tuple(arrays[key].shape) != tuple(variable.shape):
                raise UserInputError(
                    f"The checkpoint {str(path)!r} does not match the run being resumed "
                    f"({key} is of shape {tuple(arrays[key].shape)} there, "
                    f"{tuple(variable.shape)} here): another network wrote it; start a new run."
                )


def exists(run_dir):
    """Whether `run_dir` holds a checkpoint of this format."""
    return Checkpoints(run_dir).exists()


def legacy(run_dir):
    """Whether `run_dir` holds TensorFlow checkpoints of pibconv_tf 0.1 (not resumable)."""
    return (pathlib.Path(run_dir) / DIRECTORY / "checkpoint").is_file()


class _DamagedError(Exception):
    pass


def _say(message):
    print(message, file=sys.stderr, flush=True)


def _write_atomic(path, content):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
