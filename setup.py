"""Installs pibconv_tf: PIBConv / DARTS search and evaluation in Keras 3 + TensorFlow."""

import pathlib
import re

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name="requirements.txt"):
    lines = (_HERE / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setuptools.setup(
    name="pibconv_tf",
    version=re.search(r'__version__ = "(.+)"', (_HERE / "pibconv_tf" / "__init__.py").read_text())[
        1
    ],
    description=(
        "Pseudo-Inverted Bottleneck Convolution for DARTS search space "
        "(Keras 3 / TensorFlow implementation of arXiv 2301.01286)."
    ),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["pibconv_tf", "pibconv_tf.*", "apps", "edge"]),
    install_requires=_requirements(),
    extras_require={"jax": _requirements("requirements-jax.txt")},
    license="MIT",
)
