"""The networks, in Keras and `keras.ops` only: any Keras backend runs them.

numerics (PyTorch's initialisation, norms and padding) -> search_spaces and operations (the
DARTS primitives) and pib_conv (PIBConv, the ConvNeXt block) -> genotypes and cells ->
networks (the derived NetworkCIFAR) and search_network (MixedOp, SearchNetwork);
complexity counts their parameters and MACs; acceleration is the hook through which the
optional `pibconv_tf.kernels` speed up training without changing what is computed or saved.
"""
