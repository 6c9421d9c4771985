r"""DARTS architecture search over a PIBConv (or other) search space.

A quick run on the embedded digits (no download, a few minutes on a CPU):

    python -m apps.search --dataset=digits --model_dir=runs/search --epochs=2 \
        --layers=3 --init_channels=8 --batch_size=32

The paper's search (CIFAR-10, prepared for TFDS in --data_dir; first order; add --unrolled
for DARTS' second order):

    python -m apps.search --dataset=cifar10 --model_dir=runs/search_pibconv

Interrupted (Ctrl-C stops after the current step with a checkpoint of it)? Continue where it
stopped; the stored configuration is reused, and a flag given with another value is refused:

    python -m apps.search --resume --model_dir=runs/search_pibconv

Outputs in --model_dir: config.json, genotype.json (final), genotypes.jsonl, alphas.npz,
metrics.jsonl, tensorboard/, checkpoints/.
"""

from apps import common  # noqa: I001 (first: sets the TensorFlow log level)

import dataclasses
import pathlib

from absl import flags

from pibconv_tf.model import search_spaces
from pibconv_tf.errors import UserInputError
from pibconv_tf.search import run, seeds
from pibconv_tf.search.config import SearchConfig

FLAGS = flags.FLAGS

_SHARED = common.define(
    "dataset",
    "data_dir",
    "image_size",
    "seed",
    "strategy",
    "sync_batch_norm",
    "model_dir",
    "resume",
    "overwrite",
    "mixed_precision",
    "jit_compile",
    "backend",
    *common.RUNTIME,
)

_SEARCH_SPACE = flags.DEFINE_string(
    "search_space",
    "pibconv",
    f"Operation set to search over: {', '.join(search_spaces.SEARCH_SPACES)}.",
)
_INIT_CHANNELS = flags.DEFINE_integer("init_channels", 16, "C, channels of the first cells.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Cells of the search network (>= 3).")
_NODES = flags.DEFINE_integer("nodes", 4, "Intermediate nodes per cell.")
_EPOCHS = flags.DEFINE_integer("epochs", 50, "Search epochs (the cosine schedule's period).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 64, "Global batch size of the training and of the validation batches."
)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate",
    0.0025,
    "Initial SGD learning rate of the weights; the PIBConv paper uses 0.0025, DARTS 0.025.",
)
_LEARNING_RATE_MIN = flags.DEFINE_float(
    "learning_rate_min", 0.001, "Final learning rate of the per-epoch cosine annealing."
)
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 3e-4, "SGD L2 weight decay (coupled).")
_GRAD_CLIP = flags.DEFINE_float("grad_clip", 5.0, "Global norm the weight gradient is clipped to.")
_ARCH_LEARNING_RATE = flags.DEFINE_float(
    "arch_learning_rate", 3e-4, "Adam learning rate of the architecture weights (alphas)."
)
_ARCH_WEIGHT_DECAY = flags.DEFINE_float(
    "arch_weight_decay", 1e-3, "L2 weight decay added to the alphas' gradient."
)
_TRAIN_PORTION = flags.DEFINE_float(
    "train_portion",
    0.5,
    "Share of the training split that trains the weights; the rest trains the alphas.",
)
_UNROLLED = flags.DEFINE_bool(
    "unrolled", False, "Second-order DARTS: the one-step unrolled architecture gradient."
)
_HESSIAN = flags.DEFINE_enum(
    "hessian",
    "finite_difference",
    ["finite_difference", "exact"],
    "With --unrolled, the Hessian-vector product: DARTS' central finite difference, or "
    "exact by forward-over-reverse differentiation (--backend=jax only).",
)
_MAX_SKIP = flags.DEFINE_integer(
    "max_skip",
    None,
    "Keep at most this many skip connections in the derived normal cell (P-DARTS, arXiv "
    "1904.12760: the weakest skips give way to their edges' next best operations); unset: "
    "DARTS' derivation.",
)
_EARLY_STOP = flags.DEFINE_bool(
    "early_stop",
    False,
    "Stop the search at the end of the first epoch whose derived normal cell has two or "
    "more skip connections, and derive the genotype there (DARTS+, arXiv 1909.06035).",
)
_BETA_REGULARIZATION = flags.DEFINE_float(
    "beta_regularization",
    0.0,
    "lambda_max of beta-DARTS' Beta-Decay regularisation of the alphas (arXiv 2203.01665): "
    "lambda * mean logsumexp(alpha) joins the architecture loss, lambda rising linearly from "
    "0 at the first epoch to lambda_max at --epochs (the authors' 50-epoch setting is 25); "
    "0: off.",
)
_PARTIAL_CHANNELS = flags.DEFINE_integer(
    "partial_channels",
    1,
    "K of PC-DARTS (arXiv 1907.05737): each edge's operations see 1/K of its channels (the "
    "rest bypass them, then the channels are shuffled) and each node weights its edges by a "
    "softmax of edge betas; less memory and time per step. 1: DARTS' edges. PC-DARTS uses 4.",
)
_INLINE_TRACES = flags.DEFINE_bool(
    "inline_traces",
    None,
    "Let TensorFlow inline the shared mixed-operation traces into the step's graph. Unset "
    "(the default) or --noinline_traces runs them as function calls: measured on the "
    "paper's search network (batch 8, 2-core CPU, with the default --recompute), the first "
    "batch after 33 s instead of 76 s (first order) and 89 s instead of 207 s (second), at "
    "0.4-0.5x the memory and the same or faster steps (docs/performance.md). Not with "
    "--sync_batch_norm, which does not share traces. May change on --resume.",
)
_RECOMPUTE = flags.DEFINE_bool(
    "recompute",
    None,
    "Recompute each mixed operation in the backward pass instead of holding its activations "
    "(gradient checkpointing through TensorFlow's shared traces): ~8 instead of ~150 MB per "
    "image on the paper's network and faster steps there (docs/performance.md); same "
    "gradients. Unset (the default): on with TensorFlow, off on JAX and with "
    "--sync_batch_norm, where it is not offered. May change on --resume.",
)
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", None, "Cap on the steps of an epoch (quick trials); 0 or unset: all."
)
_STOP_AFTER_EPOCH = flags.DEFINE_integer(
    "stop_after_epoch",
    None,
    "End the process after this epoch as if interrupted (to try --resume); the schedule "
    "still spans --epochs.",
)
_RUN_EAGERLY = flags.DEFINE_bool(
    "run_eagerly", False, "Run the train step eagerly (debugging; slow on big networks)."
)
_VERBOSE = flags.DEFINE_integer("verbose", 1, "Keras fit verbosity: 0 silent, 1 bar, 2 lines.")


_SEEDS = flags.DEFINE_list(
    "seeds",
    None,
    "DARTS' seed protocol: one search per seed (e.g. 0,1,2,3), each in --model_dir/seed_<s> "
    "and resumable one by one; seeds.json/seeds.md summarise them and genotype.json is the "
    "genotype with the best validation accuracy. --resume continues the protocol.",
)


# Every SearchConfig field is the flag of the same name.
CONFIG_FLAGS = tuple(field.name for field in dataclasses.fields(SearchConfig))


def config_from_flags():
    """The SearchConfig of the command line; with --resume, the run's stored configuration
    with the flags given again laid over it (a differing one is refused by name)."""
    values = {name: FLAGS[name].value for name in CONFIG_FLAGS}
    if values["resume"]:
        overrides = {name: values[name] for name in CONFIG_FLAGS if FLAGS[name].present}
        overrides.pop("resume", None)
        return run.resumed_config(values["model_dir"], overrides)
    return SearchConfig.from_dict(values)


def main(argv):
    del argv
    config = config_from_flags()
    chosen = _seeds(config)
    try:
        if chosen:
            summary = seeds.run_seeds(config, chosen)
            print((pathlib.Path(config.model_dir) / seeds.TABLE).read_text(), end="")
            print(f"Selected: seed {summary['selected_seed']} -> {config.model_dir}/genotype.json")
            return
        genotype = run.run_search(config)
    except KeyboardInterrupt as error:
        common.interrupted("apps.search", config.model_dir, error)
    print(genotype.to_json(indent=2))


def _seeds(config):
    """--seeds as integers; on --resume without it, the stored protocol's seeds (if any)."""
    if _SEEDS.value is None:
        return seeds.stored_seeds(config.model_dir) if config.resume else None
    try:
        values = [int(s) for s in _SEEDS.value]
    except ValueError:
        raise UserInputError(
            f"--seeds must list integers >= 0, got {','.join(_SEEDS.value)!r}."
        ) from None
    return seeds.check_seeds(values)


if __name__ == "__main__":
    common.run(main)
