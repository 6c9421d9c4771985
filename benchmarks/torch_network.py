"""CPU benchmark of a PyTorch re-statement of the derived PIBCONV network (NetworkCIFAR).

A standalone script, not a test: it times, on this machine, the authors' PyTorch form of the
network that `pibconv_tf.model.networks.network_cifar(genotypes.PIBCONV, ...)` builds (the
re-statement of tests/authors_code.py, which the parity tests check against ours), so that
our TensorFlow figures can be compared with PyTorch on the same CPU.

- Parameter check: the trainable parameter count of the PyTorch network, with and without
  the auxiliary head, against our Keras model's (computed in a subprocess, so TensorFlow is
  never loaded in the timed process).
- Training step: batch 32 of 32x32 random images, C = 36, drop path 0.1, auxiliary head
  (loss weight 0.4), SGD(lr 0.025, momentum 0.9, weight decay 3e-4), gradient clipping at
  norm 5, 2 threads. Images/s (median, min, max) and process CPU seconds per step.
- Inference: batch 1, eval mode, no_grad, 1 and 2 threads; median ms over repeats that
  each loop for at least 0.2 s.
- PIBConv's grouped convolution 2C -> C (groups = C) is computed either as PyTorch's
  grouped convolution ("grouped", the authors' form) or as a depthwise convolution on the
  2C channels followed by a sum of channel pairs ("depthwise", the form of our TF code).

Usage:
    .venv/bin/python -m benchmarks.torch_network --output=runs/bench/torch.jsonl
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests import authors_code

STEM_MULTIPLIER = authors_code.STEM_MULTIPLIER
DEFAULT_STEPS = {2: 10, 10: 5, 20: 3}


class PseudoInvBnDepthwise(authors_code.PseudoInvBn):
    """The released PseudoInvBn with its grouped convolution computed as a depthwise
    convolution over the 2C expanded channels and a sum of each group's channel pair (the
    form of our TensorFlow code; the same weight, the same numbers)."""

    def forward(self, x):
        dw, bn, expand, grouped, act, project = self.op
        x = expand(bn(dw(x)))
        weight = grouped.weight  # input channel 2g + i of group g meets [g, i]
        channels, pairs, k = weight.shape[0], weight.shape[1], weight.shape[-1]
        y = F.conv2d(x, weight.reshape(channels * pairs, 1, k, k), None, 1, k // 2, 1, x.shape[1])
        n, _, h, w = y.shape
        return project(act(y.reshape(n, channels, pairs, h, w).sum(dim=2)))


def NetworkCIFAR(c, num_classes, layers, auxiliary, depthwise=False):  # noqa: N802
    """The released NetworkCIFAR with the PIBCONV genotype (`depthwise`: see above)."""
    return authors_code.NetworkCIFAR(
        c,
        num_classes,
        layers,
        auxiliary,
        authors_code.PIBCONV,
        pib_conv=PseudoInvBnDepthwise if depthwise else None,
    )


def count_parameters(model):
    """Trainable registered parameters (a search network's alphas are not registered)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# Parameter counts of our Keras network (run in a subprocess).
# --------------------------------------------------------------------------------------


def keras_counts_main(layer_list, channels):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras  # TensorFlow is imported in this subprocess only

    from pibconv_tf.model import genotypes, networks

    ours = genotypes.PIBCONV
    same = (
        tuple(map(tuple, ours.normal)) == tuple(map(tuple, authors_code.PIBCONV.normal))
        and tuple(ours.normal_concat) == tuple(authors_code.PIBCONV.normal_concat)
        and tuple(map(tuple, ours.reduce)) == tuple(map(tuple, authors_code.PIBCONV.reduce))
        and tuple(ours.reduce_concat) == tuple(authors_code.PIBCONV.reduce_concat)
    )
    counts = {"genotype_matches": same}
    for layers in layer_list:
        for auxiliary in (False, True):
            model = networks.network_cifar(
                ours, layers=layers, init_channels=channels, auxiliary=auxiliary
            )
            total = sum(int(v.numpy().size) for v in model.trainable_weights)
            counts[f"{layers}_{int(auxiliary)}"] = total
            del model
            keras.backend.clear_session()
    print(json.dumps(counts))


def subprocess_json(script, arguments):
    """Runs `python script arguments` from the repository root; the JSON of its last line.

    The Keras side of a comparison runs this way, so TensorFlow never loads into the process
    that times PyTorch. None (and its stderr shown) if the process fails.
    """
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, str(script), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if result.returncode:
        print(result.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def keras_counts(layer_list, channels):
    layers = ",".join(map(str, layer_list))
    return subprocess_json(
        __file__, ["--keras-counts", f"--channels={channels}", f"--layers={layers}"]
    )


# --------------------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------------------


def train_benchmark(layers, channels, batch, steps, warmup, drop_path_rate, depthwise, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = NetworkCIFAR(channels, 10, layers, auxiliary=True, depthwise=depthwise)
    model.train()
    model.drop_path_prob = drop_path_rate
    optimizer = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    images = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad()
        logits, logits_aux = model(images)
        loss = F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(logits_aux, labels)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        return loss.item()

    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    rates = [batch / w for w in walls]
    return {
        "kind": "train",
        "layers": layers,
        "channels": channels,
        "batch": batch,
        "threads": threads,
        "grouped_conv": "depthwise" if depthwise else "grouped",
        "drop_path": drop_path_rate,
        "steps": steps,
        "warmup": warmup,
        "images_per_s_median": batch / statistics.median(walls),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "step_s_median": statistics.median(walls),
        "cpu_s_per_step_median": statistics.median(cpus),
        "cpu_s_per_step_mean": statistics.fmean(cpus),
        "parameters": count_parameters(model),
    }


def inference_benchmark(layers, channels, threads, repeats, min_seconds, depthwise):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = NetworkCIFAR(channels, 10, layers, auxiliary=False, depthwise=depthwise).eval()
    image = torch.randn(1, 3, 32, 32)
    results = []
    with torch.no_grad():
        warm_end = time.perf_counter() + max(min_seconds, 0.2)
        while time.perf_counter() < warm_end:
            model(image)
        for _ in range(repeats):
            count, start = 0, time.perf_counter()
            while True:
                model(image)
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            results.append(1000.0 * elapsed / count)
    return {
        "kind": "inference",
        "layers": layers,
        "channels": channels,
        "batch": 1,
        "threads": threads,
        "grouped_conv": "depthwise" if depthwise else "grouped",
        "repeats": repeats,
        "ms_median": statistics.median(results),
        "ms_min": min(results),
        "ms_max": max(results),
    }


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/bench/torch.jsonl", help="JSON lines path")
    parser.add_argument("--layers", default="2,10,20", help="comma-separated cell counts")
    parser.add_argument("--channels", type=int, default=36)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10/5/3)")
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="inference repeats")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="per inference repeat")
    parser.add_argument("--depthwise-layers", default="10", help="layers for the depthwise form")
    parser.add_argument("--skip-keras", action="store_true", help="skip the Keras count check")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--keras-counts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layer_list = [int(v) for v in args.layers.split(",") if v]
    if args.keras_counts:
        keras_counts_main(layer_list, args.channels)
        return 0

    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records = []

    def emit(record):
        record = {**record, "load_average": load_average(), "torch": torch.__version__}
        records.append(record)
        with output.open("a") as f:
            f.write(json.dumps(record) + "\n")

    print(f"torch {torch.__version__}, load average {load_average()}")
    ours = None if args.skip_keras else keras_counts(layer_list, args.channels)
    if ours is not None:
        print(f"genotype matches pibconv_tf.model.genotypes.PIBCONV: {ours['genotype_matches']}")
    print(f"{'layers':>6} {'aux':>4} {'torch params':>13} {'keras params':>13} {'match':>6}")
    all_match = True
    for layers in layer_list:
        for auxiliary in (False, True):
            count = count_parameters(NetworkCIFAR(args.channels, 10, layers, auxiliary))
            theirs = None if ours is None else ours[f"{layers}_{int(auxiliary)}"]
            match = None if theirs is None else theirs == count
            all_match = all_match and match is not False
            shown = "-" if theirs is None else f"{theirs:,}"
            print(f"{layers:>6} {int(auxiliary):>4} {count:>13,} {shown:>13} {match!s:>6}")
            emit(
                {
                    "kind": "parameters",
                    "layers": layers,
                    "channels": args.channels,
                    "auxiliary": auxiliary,
                    "torch_parameters": count,
                    "keras_parameters": theirs,
                    "match": match,
                }
            )

    if not args.skip_train:
        runs = [(layers, False) for layers in layer_list]
        runs += [(int(v), True) for v in args.depthwise_layers.split(",") if v]
        print(f"\ntraining step: batch {args.batch}, {args.train_threads} threads, aux 0.4")
        print(
            f"{'layers':>6} {'grouped conv':>12} {'img/s med':>10} {'min':>8} {'max':>8} "
            f"{'CPU s/step':>10} {'load':>5}"
        )
        for layers, depthwise in runs:
            steps = args.steps or DEFAULT_STEPS.get(layers, 5)
            r = train_benchmark(
                layers,
                args.channels,
                args.batch,
                steps,
                args.warmup,
                args.drop_path,
                depthwise,
                args.train_threads,
            )
            emit(r)
            print(
                f"{layers:>6} {r['grouped_conv']:>12} {r['images_per_s_median']:>10.1f} "
                f"{r['images_per_s_min']:>8.1f} {r['images_per_s_max']:>8.1f} "
                f"{r['cpu_s_per_step_median']:>10.3f} {load_average()[0]:>5.2f}",
                flush=True,
            )

    if not args.skip_inference:
        print("\ninference: batch 1, eval, no_grad")
        print(f"{'layers':>6} {'threads':>7} {'ms med':>8} {'min':>8} {'max':>8} {'load':>5}")
        for layers in layer_list:
            for threads in (1, 2):
                r = inference_benchmark(
                    layers, args.channels, threads, args.repeats, args.min_seconds, False
                )
                emit(r)
                print(
                    f"{layers:>6} {threads:>7} {r['ms_median']:>8.2f} {r['ms_min']:>8.2f} "
                    f"{r['ms_max']:>8.2f} {load_average()[0]:>5.2f}",
                    flush=True,
                )
    print(f"\nload average at the end {load_average()}; wrote {len(records)} records to {output}")
    return 0 if all_match else 1


if __name__ == "__main__":
    sys.exit(main())
