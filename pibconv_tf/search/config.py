"""The configuration of a search run, with the paper's defaults and early validation.

Defaults follow the PIBConv paper's Section 4 (DARTS' search setting): C=16, 8 layers,
4 nodes, 50 epochs, batch 64, SGD lr 0.0025 (DARTS: 0.025) cosine-annealed to 0.001,
momentum 0.9, weight decay 3e-4, gradient clip 5; Adam 3e-4 with betas (0.5, 0.999) and
weight decay 1e-3 for the alphas; half of the training split trains the weights, the other
half the architecture.
"""

import dataclasses
import math
import numbers

import keras

from pibconv_tf.errors import UserInputError
from pibconv_tf.model import search_spaces

PRECISIONS = (None, "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored")
HESSIANS = ("finite_difference", "exact")


@dataclasses.dataclass
class SearchConfig:
    """Every setting of `run_search`; see `apps/search.py` for their help texts."""

    model_dir: str | None = None
    dataset: str = "cifar10"
    data_dir: str | None = None
    image_size: int = 32
    seed: int = 0
    strategy: str = "auto"
    sync_batch_norm: bool = False
    # None: the measured-best choice (function calls; recomputation where it is offered).
    inline_traces: bool | None = None
    recompute: bool | None = None
    resume: bool = False
    overwrite: bool = False
    mixed_precision: str | None = None
    jit_compile: bool = False
    search_space: str = "pibconv"
    init_channels: int = 16
    layers: int = 8
    nodes: int = 4
    epochs: int = 50
    batch_size: int = 64
    learning_rate: float = 0.0025
    learning_rate_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_learning_rate: float = 3e-4
    arch_weight_decay: float = 1e-3
    train_portion: float = 0.5
    unrolled: bool = False
    hessian: str = "finite_difference"
    max_skip: int | None = None
    early_stop: bool = False
    beta_regularization: float = 0.0
    partial_channels: int = 1
    steps_per_epoch: int | None = None
    stop_after_epoch: int | None = None
    run_eagerly: bool = False
    verbose: int = 1

    # Settings that may differ between a run and its resumption.
    RESUME_MAY_CHANGE = frozenset(
        {
            "resume",
            "overwrite",
            "stop_after_epoch",
            "verbose",
            "run_eagerly",
            "data_dir",
            "inline_traces",
            "recompute",
        }
    )

    @classmethod
    def from_dict(cls, values):
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserInputError(f"Unknown search settings {unknown}; known are {sorted(names)}.")
        return cls(**values)

    def to_dict(self):
        return dataclasses.asdict(self)

    def validate(self):
        """Raises UserInputError with one sentence for the first bad setting."""
        if not self.model_dir:
            raise UserInputError("--model_dir is required: where the run writes its outputs.")
        if not search_spaces.is_search_space(self.search_space):
            spaces = ", ".join(search_spaces.SEARCH_SPACES)
            _bad("search_space", self.search_space, f"one of {spaces}, or pibconv_f<F>")
        if self.strategy not in STRATEGIES:
            _bad("strategy", self.strategy, f"one of {', '.join(STRATEGIES)}")
        if self.mixed_precision not in PRECISIONS:
            _bad("mixed_precision", self.mixed_precision, "mixed_float16 or mixed_bfloat16")
        _check_int("init_channels", self.init_channels, 2, "an even integer >= 2")
        if self.init_channels % 2:
            _bad("init_channels", self.init_channels, "an even integer >= 2")
        _check_int("layers", self.layers, 3, "an integer >= 3 (a normal and two reductions)")
        _check_int("nodes", self.nodes, 1, "an integer >= 1")
        _check_int("partial_channels", self.partial_channels, 1, "an integer >= 1 (1: DARTS)")
        if self.sync_batch_norm and self.inline_traces is False:
            raise UserInputError(
                "--noinline_traces has no effect with --sync_batch_norm, whose edges are "
                "traced one by one instead of through shared traces; drop one of the two."
            )
        if self.sync_batch_norm and self.recompute is True:
            raise UserInputError(
                "--recompute works through the shared traces, which --sync_batch_norm does "
                "not use (its edges are traced one by one); drop one of the two."
            )
        if self.partial_channels > 1 and self.init_channels % (2 * self.partial_channels):
            raise UserInputError(
                f"--partial_channels={self.partial_channels} needs --init_channels divisible "
                f"by {2 * self.partial_channels}: each operation sees init_channels / K "
                f"channels, which must be even; got --init_channels={self.init_channels}."
            )
        _check_int("epochs", self.epochs, 1, "an integer >= 1")
        _check_int("batch_size", self.batch_size, 1, "a positive integer")
        _check_int("image_size", self.image_size, 8, "an integer >= 8")
        if self.steps_per_epoch is not None:
            _check_int("steps_per_epoch", self.steps_per_epoch, 0, "an integer >= 0 (0: all)")
        if self.max_skip is not None:
            _check_int("max_skip", self.max_skip, 0, "an integer >= 0 (unset: no limit)")
        if self.stop_after_epoch is not None:
            _check_int("stop_after_epoch", self.stop_after_epoch, 1, "an epoch from 1")
        for name in ("learning_rate", "arch_learning_rate"):
            _check_float(name, getattr(self, name), 0.0, None, "a number > 0", open_low=True)
        _check_float("learning_rate_min", self.learning_rate_min, 0.0, None, "a number >= 0")
        if self.learning_rate_min > self.learning_rate:
            _bad("learning_rate_min", self.learning_rate_min, "at most --learning_rate")
        _check_float("momentum", self.momentum, 0.0, 1.0, "a number in [0, 1)", open_high=True)
        for name in ("weight_decay", "arch_weight_decay"):
            _check_float(name, getattr(self, name), 0.0, None, "a number >= 0")
        _check_float("grad_clip", self.grad_clip, 0.0, None, "a number > 0", open_low=True)
        _check_float(
            "beta_regularization", self.beta_regularization, 0.0, None, "a number >= 0 (0: off)"
        )
        if self.hessian not in HESSIANS:
            _bad("hessian", self.hessian, " or ".join(HESSIANS))
        if self.hessian == "exact" and not self.unrolled:
            raise UserInputError(
                "--hessian=exact is the second order's Hessian-vector product; add --unrolled."
            )
        if self.hessian == "exact" and keras.backend.backend() != "jax":
            raise UserInputError(
                "--hessian=exact (forward-over-reverse differentiation) runs on JAX; add "
                "--backend=jax, or keep DARTS' finite difference on TensorFlow."
            )
        _check_float(
            "train_portion",
            self.train_portion,
            0.0,
            1.0,
            "a fraction strictly between 0 and 1",
            open_low=True,
            open_high=True,
        )
        return self


def _bad(name, value, accepted):
    raise UserInputError(f"--{name}={value!r} is not valid; expected {accepted}.")


def _check_int(name, value, minimum, accepted):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _bad(name, value, accepted)


def _check_float(name, value, low, high, accepted, open_low=False, open_high=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _bad(name, value, accepted)
    if not math.isfinite(value):  # NaN and the infinities
        raise UserInputError(f"--{name}={value!r} is not valid; expected a finite number.")
    too_low = value <= low if open_low else value < low
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        _bad(name, value, accepted)
