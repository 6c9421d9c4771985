"""Faster training kernels for TensorFlow on CPUs, behind one switch.

`pibconv_tf.model.acceleration` imports this package the first time a layer asks for a
kernel; it registers them when Keras runs on TensorFlow (on another backend, nothing). The
switch: the apps' `--cpu_kernels=auto|on|off`, the environment variable
`PIBCONV_CPU_KERNELS`, or `acceleration.set_mode`; "auto" (the default) uses them with
TensorFlow on a machine without GPUs, where they were measured to help
(docs/performance.md).

They change neither what a layer computes (to rounding) nor what it saves: `.keras` files
hold Keras' plain layers and load anywhere, and checkpoints resume with the switch in either
position. Deleting this folder (and its name in `acceleration.PROVIDERS`) leaves a working,
slower project.
"""

import keras

if keras.backend.backend() == "tensorflow":
    from pibconv_tf.kernels import tensorflow_cpu

    tensorflow_cpu.register()
