"""The configuration of an evaluation-training run: the DARTS recipe's defaults, validation.

The recipe (DARTS' `train.py`, which the PIBConv paper keeps): 600 epochs, batch 96, SGD
with momentum 0.9, coupled weight decay 3e-4, learning rate 0.025 annealed to 0 by a cosine
stepped once per epoch, gradient norm clipped at 5, cutout 16, drop path ramped linearly
from 0 to 0.2 over the epochs (p * epoch / epochs at the start of each epoch), and the
auxiliary tower's loss added with weight 0.4.

Reference:
    Liu et al., DARTS, arXiv 1806.09055 (Sec. 3.3); Ahmadian et al., arXiv 2301.01286
    (Sec. 3, Experimental Setup).
"""

import dataclasses
import math
import numbers
import os

from pibconv_tf import runs
from pibconv_tf.errors import UserInputError
from pibconv_tf.model import genotypes

MIXED_PRECISION = (None, "mixed_float16", "mixed_bfloat16")
# What defines a run: a resumed run must keep them (epochs, evaluation and devices may change).
FIXED_ON_RESUME = (
    "dataset",
    "image_size",
    "seed",
    "init_channels",
    "layers",
    "batch_size",
    "mixed_precision",
)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; written as `config.json` next to its outputs.

    Args:
        genotype: a named genotype (`PIBCONV`, `DARTS_V2`) or the path of a genotype.json.
        dataset, data_dir, image_size, seed: the data (see `data.load_source`); `seed` also
            fixes the initialisation, augmentation and drop path draws.
        init_channels, layers: C and the number of cells of `networks.network_cifar`.
        epochs, batch_size: the schedule's length and the global batch size.
        learning_rate, min_learning_rate: the cosine's start and end.
        momentum, weight_decay, grad_clip: `optim.TorchSGD` (grad_clip 0 disables clipping).
        cutout_length: cutout square side (0 disables it).
        randaugment: magnitude of keras-cv's RandAugment before the crop, flip and cutout
            (0, the default, is DARTS' recipe without it).
        drop_path_prob: the final drop path rate of the linear ramp.
        auxiliary_weight: weight of the auxiliary tower's loss; 0 builds no auxiliary head.
        eval_every: evaluate on the test split every this many epochs (and after the last).
        steps_per_epoch: 0 for whole epochs, else at most this many steps (quick runs).
        strategy, mixed_precision, jit_compile: devices and numerics.
        sync_batch_norm: BatchNorm normalises by the whole global batch's statistics (all
            replicas) instead of each replica's (DARTS' per-GPU statistics).
        model_dir, resume, overwrite: the run directory (see `runs.RunDir.prepare`).
        verbose: 0 silent, 1 Keras' progress bar and one line per epoch, 2 the line only.
    """

    genotype: str = "PIBCONV"
    dataset: str = "cifar10"
    data_dir: str | None = None
    image_size: int = 32
    seed: int = 0
    init_channels: int = 36
    layers: int = 20
    epochs: int = 600
    batch_size: int = 96
    learning_rate: float = 0.025
    min_learning_rate: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    cutout_length: int = 16
    randaugment: float = 0.0
    drop_path_prob: float = 0.2
    auxiliary_weight: float = 0.4
    eval_every: int = 1
    steps_per_epoch: int = 0
    strategy: str = "auto"
    sync_batch_norm: bool = False
    mixed_precision: str | None = None
    jit_compile: bool = False
    model_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    verbose: int = 1

    def validate(self):
        """Raises UserInputError naming the first out-of-range field."""
        _at_least(self, "init_channels", 2)
        if self.init_channels % 2:
            # FactorizedReduce splits the channels of a reduction's input in two halves.
            raise UserInputError(
                f"--init_channels must be an even number >= 2, got {self.init_channels}."
            )
        _at_least(self, "layers", 1)
        _at_least(self, "epochs", 1)
        _at_least(self, "batch_size", 1)
        _at_least(self, "eval_every", 1)
        _at_least(self, "steps_per_epoch", 0)
        _at_least(self, "cutout_length", 0)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is float and not (
                isinstance(value, numbers.Real) and not isinstance(value, bool)
            ):
                raise UserInputError(f"--{field.name} must be a number, got {value!r}.")
            if field.type is float and not math.isfinite(value):
                raise UserInputError(f"--{field.name} must be a finite number, got {value}.")
        if not self.learning_rate > 0:
            raise UserInputError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise UserInputError(
                f"--min_learning_rate must be from 0 to --learning_rate "
                f"({self.learning_rate}), got {self.min_learning_rate}."
            )
        if not 0 <= self.momentum < 1:
            raise UserInputError(f"--momentum must be in [0, 1), got {self.momentum}.")
        for name in ("weight_decay", "grad_clip", "auxiliary_weight"):
            if not getattr(self, name) >= 0:
                raise UserInputError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.randaugment <= 1:
            raise UserInputError(f"--randaugment must be in [0, 1], got {self.randaugment}.")
        if not 0 <= self.drop_path_prob < 1:
            raise UserInputError(f"--drop_path_prob must be in [0, 1), got {self.drop_path_prob}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserInputError(
                f"--mixed_precision {self.mixed_precision!r} is unknown; expected "
                "mixed_float16 or mixed_bfloat16 (or none)."
            )
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserInputError(f"Training config has unknown fields {unknown}.")
        return cls(**values)


def _at_least(config, name, minimum):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"--{name} must be an integer >= {minimum}, got {value!r}.")


def resumed_config(model_dir, overrides):
    """The config stored in `model_dir`, updated with `overrides` (the flags given again).

    `--resume --model_dir=X` alone continues the run as it was started; a field of
    `FIXED_ON_RESUME` given with another value is refused by `train`.
    """
    stored = runs.stored_config(model_dir, "run")
    own = os.path.join(model_dir, runs.GENOTYPE)
    if stored.get("genotype") not in genotypes.NAMED_GENOTYPES and os.path.isfile(own):
        stored["genotype"] = own  # the run's copy, in case the original file moved
    return TrainConfig.from_dict({**stored, **overrides, "resume": True, "overwrite": False})
