"""Speed and memory of our search, training, inference and TFLite, and the PyTorch references.

Outside the installed package: `python -m apps.benchmark` (from a checkout) drives
`harness`; `torch_network`, `torch_search` and `kernels` are standalone scripts
(`python -m benchmarks.torch_network`). No module of `pibconv_tf` imports these.
"""
