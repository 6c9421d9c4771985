"""Run directories that users can trust: refuse to clobber, resume, write atomically.

A run directory (`--model_dir`) holds `config.json`, JSON-lines logs, TensorBoard logs and
checkpoints. Starting a run into a non-empty directory needs `--resume` (continue from the
last checkpoint) or `--overwrite` (start over); anything else is refused before a file is
touched.
"""

import json
import os
import pathlib
import shutil
import tempfile

import tensorflow as tf

from pibconv_tf.errors import UserInputError

CHECKPOINT_DIR = "checkpoints"
CONFIG = "config.json"


class RunDir:
    """A prepared run directory.

    Attributes:
        path: the directory.
        resumed: whether the run continues a previous one (a checkpoint exists).
    """

    def __init__(self, path, resumed=False):
        self.path = pathlib.Path(path)
        self.resumed = resumed

    @classmethod
    def prepare(cls, path, resume=False, overwrite=False):
        """Validates `path` for a new or resumed run, creating or emptying it as asked."""
        if not path:
            raise UserInputError("--model_dir is required: where the run writes its outputs.")
        if resume and overwrite:
            raise UserInputError("--resume and --overwrite contradict each other; pass one.")
        path = pathlib.Path(path)
        if path.exists() and not path.is_dir():
            raise UserInputError(f"--model_dir {str(path)!r} exists and is not a directory.")
        non_empty = path.is_dir() and any(path.iterdir())
        if resume:
            if not latest_checkpoint(path):
                raise UserInputError(
                    f"--resume was given but {str(path)!r} holds no checkpoint to resume from."
                )
            return cls(path, resumed=True)
        if non_empty and not overwrite:
            raise UserInputError(
                f"--model_dir {str(path)!r} is not empty; pass --resume to continue that run "
                "or --overwrite to replace it."
            )
        if non_empty:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def file(self, name):
        return self.path / name

    def write_json(self, name, data):
        write_json_atomic(self.file(name), data)

    def read_json(self, name):
        return json.loads(self.file(name).read_text())

    def append_jsonl(self, name, record):
        with open(self.file(name), "a") as stream:
            stream.write(json.dumps(record, sort_keys=True) + "\n")

    def read_jsonl(self, name):
        path = self.file(name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_jsonl(self, name, keep):
        """Keeps the records for which `keep(record)` holds (drops epochs after a checkpoint)."""
        records = [record for record in self.read_jsonl(name) if keep(record)]
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        write_text_atomic(self.file(name), text)
        return records

    def checkpoint_manager(self, max_to_keep=2, **trackables):
        """A tf.train.CheckpointManager over `trackables` (models, optimizers, variables)."""
        checkpoint = tf.train.Checkpoint(**trackables)
        return tf.train.CheckpointManager(
            checkpoint, str(self.file(CHECKPOINT_DIR)), max_to_keep=max_to_keep
        )


def latest_checkpoint(path):
    return tf.train.latest_checkpoint(str(pathlib.Path(path) / CHECKPOINT_DIR))


def write_text_atomic(path, text):
    """Writes `text` to `path` through a temporary file, so a crash never leaves half a file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
    os.replace(tmp, path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path, data):
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
