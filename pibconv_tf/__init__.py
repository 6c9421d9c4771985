"""pibconv_tf: Pseudo-Inverted Bottleneck Convolution for the DARTS search space.

Keras 3 / TensorFlow implementation of Ahmadian et al., ICASSP 2023 (arXiv 2301.01286).
"""

__version__ = "0.2.0"
