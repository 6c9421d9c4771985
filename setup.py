"""Installs pibconv_tf: PIBConv / DARTS search and evaluation in Keras 3 + TensorFlow."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
    lines = (_HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="pibconv_tf",
    version="0.1.0",
    description=(
        "Pseudo-Inverted Bottleneck Convolution for DARTS search space "
        "(Keras 3 / TensorFlow implementation of arXiv 2301.01286)."
    ),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["pibconv_tf", "pibconv_tf.*", "apps", "edge"]),
    install_requires=_requirements(),
    license="MIT",
)
