"""CPU benchmark of the kernel choices the training fast paths rest on (oneDNN workarounds).

A standalone script, not a test: it times, in this process, each kernel the training code
avoids against the form it takes instead, at the shapes of the PIBCONV evaluation network
(batch 32, C = 36 / 72 / 144 at 32x32 / 16x16 / 8x8), one thread per operation as the apps
run on small CPUs. Re-run it after a TensorFlow upgrade: if a ratio falls to 1 or below,
the workaround in `pibconv_tf/kernels.py` it justifies can go.

- batch_norm: the fused training BatchNorm, forward and forward + backward, on [N, H, W, C]
  against the same values viewed as [N H W, 1, 1, C] (taken when C % 16 != 0).
- depthwise_stride_1: forward and both gradients of a stride-1 "same" depthwise convolution,
  TensorFlow's against `depthwise_conv2d_training` (filter gradient as one convolution),
  for kernels 3 (not taken: slower), 5, 7 and 5 with dilation 2.
- depthwise_stride_2: a stride-2 depthwise convolution with PyTorch's symmetric padding, as
  a padded copy + "VALID" against `depthwise_conv2d_training` (explicit padding).

Prints one line per case: milliseconds of each form (median of 7 repeats of 20 calls after
two warm-up calls) and their ratio; `--output` also writes them as JSON lines.

Usage:
    .venv/bin/python -m benchmarks.kernels --output=runs/bench/kernels.jsonl
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pibconv_tf.kernels import tensorflow_cpu as kernels  # noqa: E402

BATCH = 32


def _median_ms(function, *args, calls=20, repeats=7):
    function(*args)
    function(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            result = function(*args)
        np.asarray(result[0])
        times.append((time.perf_counter() - start) / calls)
    return 1e3 * float(np.median(times))


def _forward_backward(convolve, x, w, dy):
    @tf.function
    def step(x, w):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = convolve(x, w)
        return [y, *tape.gradient(y, [x, w], output_gradients=dy)]

    return step


def batch_norm_cases():
    for size, channels in ((32, 36), (32, 72), (32, 108), (16, 72), (16, 144), (8, 144)):
        shape = (BATCH, size, size, channels)
        x = tf.random.normal(shape)
        dy = tf.random.normal(shape)

        def make(flat, channels=channels, dy=dy):
            def normalise(t):
                view = tf.reshape(t, (-1, 1, 1, channels)) if flat else t
                y, *_ = tf.raw_ops.FusedBatchNormV3(
                    x=view,
                    scale=tf.ones(channels),
                    offset=tf.zeros(channels),
                    mean=tf.zeros((0,)),
                    variance=tf.zeros((0,)),
                    epsilon=1e-5,
                    is_training=True,
                )
                return tf.reshape(y, tf.shape(t))

            @tf.function
            def both(t):
                with tf.GradientTape() as tape:
                    tape.watch(t)
                    y = normalise(t)
                return [y, tape.gradient(y, t, output_gradients=dy)]

            return tf.function(lambda t: [normalise(t)]), both

        (plain_fwd, plain_both), (flat_fwd, flat_both) = make(False), make(True)
        for what, plain, flat in (
            ("forward", plain_fwd, flat_fwd),
            ("fwd+bwd", plain_both, flat_both),
        ):
            yield {
                "case": "batch_norm",
                "shape": list(shape),
                "what": what,
                "taken": bool(channels % 16),
                "ms_tensorflow": _median_ms(plain, x),
                "ms_ours": _median_ms(flat, x),
            }


def depthwise_stride_1_cases():
    for size, channels, kernel, dilation in (
        (32, 36, 3, 1),
        (32, 36, 5, 1),
        (16, 72, 5, 1),
        (16, 72, 7, 1),
        (16, 72, 5, 2),
        (8, 144, 5, 1),
    ):
        x = tf.random.normal((BATCH, size, size, channels))
        w = tf.random.normal((kernel, kernel, channels, 1))
        dy = tf.random.normal(x.shape)
        rates = None if dilation == 1 else (dilation, dilation)
        plain = _forward_backward(
            lambda t, k, r=rates: tf.nn.depthwise_conv2d(t, k, (1, 1, 1, 1), "SAME", dilations=r),
            x,
            w,
            dy,
        )
        ours = _forward_backward(
            lambda t, k, d=dilation: kernels.depthwise_conv2d_training(t, k, 1, d),
            x,
            w,
            dy,
        )
        yield {
            "case": "depthwise_stride_1",
            "shape": [BATCH, size, size, channels],
            "kernel": kernel,
            "dilation": dilation,
            "what": "fwd+bwd",
            "taken": kernel >= 5,
            "ms_tensorflow": _median_ms(plain, x, w),
            "ms_ours": _median_ms(ours, x, w),
        }


def depthwise_stride_2_cases():
    for size, channels, kernel in (
        (32, 72, 3),
        (32, 72, 5),
        (32, 72, 7),
        (16, 144, 3),
        (16, 144, 5),
    ):
        pad = kernel // 2
        x = tf.random.normal((BATCH, size, size, channels))
        w = tf.random.normal((kernel, kernel, channels, 1))
        dy = tf.random.normal((BATCH, size // 2, size // 2, channels))
        paddings = [[0, 0], [pad, pad], [pad, pad], [0, 0]]
        plain = _forward_backward(
            lambda t, k, p=paddings: tf.nn.depthwise_conv2d(tf.pad(t, p), k, (1, 2, 2, 1), "VALID"),
            x,
            w,
            dy,
        )
        ours = _forward_backward(
            lambda t, k, p=pad: kernels.depthwise_conv2d_training(t, k, 2, 1, p),
            x,
            w,
            dy,
        )
        yield {
            "case": "depthwise_stride_2",
            "shape": [BATCH, size, size, channels],
            "kernel": kernel,
            "what": "fwd+bwd",
            "taken": True,
            "ms_tensorflow": _median_ms(plain, x, w),
            "ms_ours": _median_ms(ours, x, w),
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the records as JSON lines here")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    records = []
    for cases in (batch_norm_cases, depthwise_stride_1_cases, depthwise_stride_2_cases):
        for record in cases():
            record["speedup"] = record["ms_tensorflow"] / record["ms_ours"]
            records.append(record)
            details = {k: v for k, v in record.items() if k in ("kernel", "dilation")}
            print(
                f"{record['case']:19s} {str(record['shape']):18s} {str(details):28s} "
                f"{record['what']:8s} TensorFlow {record['ms_tensorflow']:6.2f} ms  ours "
                f"{record['ms_ours']:6.2f} ms  {record['speedup']:4.2f}x"
                f"{'' if record['taken'] else '  (not taken)'}",
                flush=True,
            )
    if args.output:
        path = pathlib.Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
