"""pibconv_tf: Pseudo-Inverted Bottleneck Convolution for the DARTS search space.

Keras 3 / TensorFlow implementation of Ahmadian et al., ICASSP 2023 (arXiv 2301.01286).

The public API, loaded on first use (so `import pibconv_tf` loads neither Keras nor a
backend):

```python
import pibconv_tf as pt

block = pt.PIBConv(filters=16, kernel_size=3)
model = pt.network_cifar(pt.PIBCONV, num_classes=10, init_channels=16, layers=2)
genotype = pt.run_search(pt.SearchConfig(dataset="digits", model_dir="runs/search",
                                         epochs=2, layers=3, init_channels=8))
result = pt.run_training(pt.TrainConfig(genotype="runs/search/genotype.json", dataset="digits",
                                        layers=2, init_channels=16, epochs=10,
                                        model_dir="runs/train"))
```
"""

import importlib

__version__ = "0.2.0"

# name -> the module that defines it (or (module, its name there)).
_API = {
    "PIBConv": "pibconv_tf.model.pib_conv",
    "ConvNeXtBlock": "pibconv_tf.model.pib_conv",
    "network_cifar": "pibconv_tf.model.networks",
    "SearchNetwork": "pibconv_tf.model.search_network",
    "Genotype": "pibconv_tf.model.genotypes",
    "PIBCONV": "pibconv_tf.model.genotypes",
    "DARTS_V2": "pibconv_tf.model.genotypes",
    "load_genotype": "pibconv_tf.model.genotypes",
    "get_search_space": "pibconv_tf.model.search_spaces",
    "model_complexity": "pibconv_tf.model.complexity",
    "SearchConfig": "pibconv_tf.search.config",
    "run_search": "pibconv_tf.search.run",
    "TrainConfig": "pibconv_tf.train.config",
    "run_training": ("pibconv_tf.train.run", "train"),  # `train` is the subpackage
    "load_model": "pibconv_tf.model.saving",
    "UserInputError": "pibconv_tf.errors",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'pibconv_tf' has no attribute {name!r}")
    module, attribute = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
