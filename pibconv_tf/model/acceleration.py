"""The one switch between the model and optional faster kernels of one backend.

The model computes with Keras layers and `keras.ops` only. At a few places in training (a
BatchNorm, a 1x1 or depthwise convolution, GELU, PIBConv's expansion and grouped
convolution, the stem, the order of a cell's inputs) it asks `kernel(name)` whether a faster
implementation of the same numbers is registered; `pibconv_tf.kernels` registers
TensorFlow's CPU kernels there. A kernel returns None when it does not apply to its inputs
(another dtype, a GPU, an unknown size), and the model then takes its plain form.

Kernels change neither the variables nor the configuration of a layer, so a `.keras` file or
a checkpoint written in one position of the switch loads and resumes in the other, and where
no kernels are registered (another backend, or the kernels package deleted) the model is the
same, slower.

The kernels package is found through `PROVIDERS` at the first question, so importing the
model loads no backend's kernels. The switch: `set_mode("auto" | "on" | "off")`, the apps'
`--cpu_kernels` flag, or the environment variable `PIBCONV_CPU_KERNELS` (read at import).
"auto" lets the registered package decide where its kernels help (`pibconv_tf.kernels`:
TensorFlow without a GPU).
"""

import contextlib
import importlib
import os

MODES = ("auto", "on", "off")
ENVIRONMENT_VARIABLE = "PIBCONV_CPU_KERNELS"

# Packages that register kernels, imported at the first question (not at import time, so
# that importing the model loads no backend); one that is absent leaves the plain forms.
PROVIDERS = ("pibconv_tf.kernels",)

_kernels = {}
_helps = None  # callable () -> bool: where "auto" turns the kernels on
_mode = "auto"
_loaded = False


def _load_providers():
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in PROVIDERS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # the package exists but one of its imports failed
                raise


def check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"Unknown kernel mode {mode!r}; expected one of {', '.join(MODES)}.")
    return mode


def register(name, function, helps=None):
    """Registers `function` as the kernel `name`; `helps()` decides the "auto" mode."""
    global _helps
    _kernels[name] = function
    if helps is not None:
        _helps = helps


def set_mode(mode):
    """Sets the switch ("auto", "on" or "off") for the layers traced from now on."""
    global _mode
    _mode = check_mode(mode)


def mode():
    return _mode


def enabled():
    """Whether registered kernels are used now."""
    if _mode == "off":
        return False
    _load_providers()
    if not _kernels:
        return False
    if _mode == "on":
        return True
    return bool(_helps is None or _helps())


def kernel(name):
    """The kernel registered as `name` when the switch is on, else None."""
    return _kernels.get(name) if enabled() else None


def registered():
    """The names of the registered kernels."""
    _load_providers()
    return sorted(_kernels)


@contextlib.contextmanager
def using(new_mode):
    """Sets the switch for a block (tests, export: `using("off")`)."""
    previous = _mode
    set_mode(new_mode)
    try:
        yield
    finally:
        set_mode(previous)


def mode_from_environment():
    """The mode `PIBCONV_CPU_KERNELS` asks for ("auto" when unset); ValueError if unknown."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(
            f"{ENVIRONMENT_VARIABLE}={value!r} is not a kernel mode; expected one of "
            f"{', '.join(MODES)}."
        )
    return value


with contextlib.suppress(ValueError):  # an unknown value is reported by the apps
    set_mode(mode_from_environment())
