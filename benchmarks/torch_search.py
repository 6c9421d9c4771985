"""CPU benchmark of a PyTorch DARTS search step over the pibconv space (first and second order).

A standalone script, not a test: it times, on this machine, the authors' PyTorch form of the
search step that `pibconv_tf.search.trainer.SearchTrainer` runs, so that our TensorFlow
search figures can be compared with PyTorch on the same CPU.

- The search network follows DARTS' `model_search.py`: stem 3x3 conv 3 -> 3C + BatchNorm,
  `layers` cells with reductions at layers//3 and 2*layers//3, cells of 4 nodes whose 14
  edges are MixedOps (softmax(alpha)-weighted sums of the 10 operations of the pibconv
  space, non-affine BatchNorm, the pools alone), global average pooling and a linear
  classifier: the released PIBConv code, re-stated in tests/authors_code.py (ReLU in the
  dilated and 7x1-1x7 convolutions, GELU in PIBConv, whose grouped kxk 2C -> C convolution
  is PyTorch's grouped convolution). The `none` operation is computed as DARTS does
  (`x.mul(0.)`, weighted and summed) unless `--skip-none` is given.
- The step follows DARTS' `train_search.py` / `architect.py`: the architecture update on
  the validation batch (first order: `loss.backward()` of L_val; second order: the unrolled
  model built with `model.new()` and `load_state_dict`, and the finite-difference
  Hessian-vector product with eps = 0.01 / ||v||), Adam(3e-4, betas (0.5, 0.999), weight
  decay 1e-3); then the weight update on the training batch: SGD(lr 0.0025, momentum 0.9,
  weight decay 3e-4) after `clip_grad_norm_(5)`.
- Parameter check: the weight parameter count (alphas excluded) against our Keras
  `SearchNetwork`'s, computed in a subprocess so that TensorFlow is never loaded in the
  timed processes.
- Each order is timed in its own subprocess (so that its peak RSS, `ru_maxrss`, is its own):
  warm-up steps, then timed steps; images/s = batch / step seconds (median, min, max),
  process CPU seconds per step, and the CPU used by other processes during the timed steps
  (from /proc/stat, in cores).

Usage:
    .venv/bin/python -m benchmarks.torch_search --output=runs/bench/torch_search.jsonl
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.torch_network import count_parameters, load_average, subprocess_json
from tests import authors_code


class SearchNetwork(authors_code.SearchNetwork):
    """The released `model_search.Network` (tests/authors_code.py) with what its architect
    uses: `new()`, `loss()`, `arch_parameters()` and alphas drawn as 1e-3 * N(0, 1)."""

    def __init__(self, c, num_classes, layers, steps=4, multiplier=4, skip_none=False):
        super().__init__(c, num_classes, layers, steps, multiplier, skip_none=skip_none)
        self.args = (c, num_classes, layers, steps, multiplier, skip_none)
        self.alphas_normal = (1e-3 * torch.randn(self.alphas_normal.shape)).requires_grad_(True)
        self.alphas_reduce = (1e-3 * torch.randn(self.alphas_reduce.shape)).requires_grad_(True)

    def arch_parameters(self):
        return [self.alphas_normal, self.alphas_reduce]

    def new(self):
        """A fresh network with copies of the alphas (DARTS' `Network.new`)."""
        model = SearchNetwork(*self.args)
        for x, y in zip(model.arch_parameters(), self.arch_parameters(), strict=True):
            x.data.copy_(y.data)
        return model

    def loss(self, x, y):
        return F.cross_entropy(self(x), y)


# --------------------------------------------------------------------------------------
# The architect (DARTS' architect.py).
# --------------------------------------------------------------------------------------


def _concat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


class Architect:
    def __init__(self, model, momentum, weight_decay, arch_lr, arch_weight_decay):
        self.model = model
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.optimizer = torch.optim.Adam(
            model.arch_parameters(), lr=arch_lr, betas=(0.5, 0.999), weight_decay=arch_weight_decay
        )

    def step(self, x_train, y_train, x_val, y_val, eta, weight_optimizer, unrolled):
        self.optimizer.zero_grad()
        if unrolled:
            self._backward_unrolled(x_train, y_train, x_val, y_val, eta, weight_optimizer)
        else:
            self.model.loss(x_val, y_val).backward()
        self.optimizer.step()

    def _compute_unrolled_model(self, x, y, eta, weight_optimizer):
        loss = self.model.loss(x, y)
        params = list(self.model.parameters())
        theta = _concat(params).data
        try:
            moment = _concat(weight_optimizer.state[p]["momentum_buffer"] for p in params)
            moment = moment.mul_(self.momentum)
        except KeyError:
            moment = torch.zeros_like(theta)
        dtheta = _concat(torch.autograd.grad(loss, params)).data + self.weight_decay * theta
        return self._construct_model_from_theta(theta.sub(eta * (moment + dtheta)))

    def _construct_model_from_theta(self, theta):
        model_new = self.model.new()
        model_dict = self.model.state_dict()
        params, offset = {}, 0
        for name, value in self.model.named_parameters():
            length = value.numel()
            params[name] = theta[offset : offset + length].view(value.size())
            offset += length
        assert offset == len(theta)
        model_dict.update(params)
        model_new.load_state_dict(model_dict)
        return model_new

    def _backward_unrolled(self, x_train, y_train, x_val, y_val, eta, weight_optimizer):
        unrolled_model = self._compute_unrolled_model(x_train, y_train, eta, weight_optimizer)
        unrolled_model.loss(x_val, y_val).backward()
        dalpha = [v.grad for v in unrolled_model.arch_parameters()]
        vector = [v.grad.data for v in unrolled_model.parameters()]
        implicit = self._hessian_vector_product(vector, x_train, y_train)
        for g, ig in zip(dalpha, implicit, strict=True):
            g.data.sub_(eta * ig.data)
        for v, g in zip(self.model.arch_parameters(), dalpha, strict=True):
            if v.grad is None:
                v.grad = g.data.clone()
            else:
                v.grad.data.copy_(g.data)

    def _hessian_vector_product(self, vector, x, y, r=1e-2):
        eps = r / _concat(vector).norm()
        params = list(self.model.parameters())
        for p, v in zip(params, vector, strict=True):
            p.data.add_(v, alpha=eps)
        grads_p = torch.autograd.grad(self.model.loss(x, y), self.model.arch_parameters())
        for p, v in zip(params, vector, strict=True):
            p.data.sub_(v, alpha=2 * eps)
        grads_n = torch.autograd.grad(self.model.loss(x, y), self.model.arch_parameters())
        for p, v in zip(params, vector, strict=True):
            p.data.add_(v, alpha=eps)
        return [(a - b).div_(2 * eps) for a, b in zip(grads_p, grads_n, strict=True)]


# --------------------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------------------


def keras_count_main(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np  # TensorFlow is imported in this subprocess only

    from pibconv_tf.model.search_network import SearchNetwork as KerasSearchNetwork
    from pibconv_tf.model.search_network import build_network

    net = KerasSearchNetwork(args.num_classes, args.channels, args.layers, 4, 4, "pibconv", seed=0)
    build_network(net, args.image_size)
    total = int(sum(np.prod(v.shape) for v in net.weight_parameters()))
    print(json.dumps({"keras_parameters": total}))


def _busy_seconds():
    """Seconds of CPU time all processes have used (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def worker_main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    unrolled = args.worker == "second"
    start = time.perf_counter()
    model = SearchNetwork(args.channels, args.num_classes, args.layers, skip_none=args.skip_none)
    build_seconds = time.perf_counter() - start
    model.train()
    weight_optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    architect = Architect(model, 0.9, args.weight_decay, args.arch_lr, args.arch_weight_decay)
    size, batch = args.image_size, args.batch
    x_train, x_val = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    y_train = torch.randint(0, args.num_classes, (batch,))
    y_val = torch.randint(0, args.num_classes, (batch,))

    def step():
        architect.step(x_train, y_train, x_val, y_val, args.lr, weight_optimizer, unrolled)
        weight_optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train), y_train)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        weight_optimizer.step()
        return loss.item()

    warm = []
    for _ in range(args.warmup):
        t = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t)
    walls, cpus, losses = [], [], []
    busy, wall0, cpu0 = _busy_seconds(), time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        losses.append(step())
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    total_wall, total_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    others = None
    if busy is not None:
        others = max(0.0, (_busy_seconds() - busy - total_cpu) / total_wall)
    # Time of `model.new()` alone: rebuilt in every second-order step.
    t = time.perf_counter()
    model.new()
    new_seconds = time.perf_counter() - t
    rates = [batch / w for w in walls]
    record = {
        "kind": "search_step",
        "order": args.worker,
        "framework": "torch",
        "torch": torch.__version__,
        "batch": batch,
        "layers": args.layers,
        "channels": args.channels,
        "nodes": 4,
        "search_space": "pibconv",
        "none_op": "skipped" if args.skip_none else "zero multiply (DARTS)",
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "warmup_step_s": warm,
        "step_s": walls,
        "step_s_median": statistics.median(walls),
        "images_per_s_median": batch / statistics.median(walls),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "cpu_s_per_step": cpus,
        "cpu_s_per_step_median": statistics.median(cpus),
        "other_processes_cpu_cores": others,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "network_build_s": build_seconds,
        "model_new_s": new_seconds,
        "losses": losses,
        "parameters": count_parameters(model),
    }
    print(json.dumps(record))


def wait_for_quiet(max_load, max_wait):
    """Waits (up to max_wait s) until the 1-minute load is at most max_load."""
    waited = 0.0
    while load_average() is not None and load_average()[0] > max_load and waited < max_wait:
        print(f"load {load_average()} above {max_load}; waiting ({waited:.0f}s)", flush=True)
        time.sleep(15)
        waited += 15
    return load_average(), waited


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/bench/torch_search.jsonl", help="JSON lines")
    parser.add_argument("--orders", default="first,second", help="comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="training = validation batch")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (first), 1 (second)")
    parser.add_argument("--steps", type=int, default=None, help="default 7 (first), 4 (second)")
    parser.add_argument("--lr", type=float, default=0.0025)
    parser.add_argument("--weight-decay", type=float, default=3e-4)
    parser.add_argument("--grad-clip", type=float, default=5.0)
    parser.add_argument("--arch-lr", type=float, default=3e-4)
    parser.add_argument("--arch-weight-decay", type=float, default=1e-3)
    parser.add_argument("--skip-none", action="store_true", help="do not compute `none`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--max-wait", type=float, default=180.0, help="seconds")
    parser.add_argument("--skip-keras", action="store_true", help="skip the Keras count check")
    parser.add_argument("--keras-count", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("first", "second"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.keras_count:
        keras_count_main(args)
        return 0
    if args.worker:
        worker_main(args)
        return 0

    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    common = [
        f"--batch={args.batch}",
        f"--layers={args.layers}",
        f"--channels={args.channels}",
        f"--num-classes={args.num_classes}",
        f"--image-size={args.image_size}",
    ]

    def emit(record):
        record = {**record, "load_average": load_average()}
        with output.open("a") as f:
            f.write(json.dumps(record) + "\n")

    print(f"torch {torch.__version__}, load average {load_average()}", flush=True)
    torch.manual_seed(args.seed)
    theirs = SearchNetwork(args.channels, args.num_classes, args.layers, skip_none=args.skip_none)
    torch_count = count_parameters(theirs)
    del theirs
    keras_count = None
    if not args.skip_keras:
        result = subprocess_json(__file__, ["--keras-count", *common])
        keras_count = None if result is None else result["keras_parameters"]
    match = None if keras_count is None else keras_count == torch_count
    print(f"weight parameters: torch {torch_count:,}, keras {keras_count}, match {match}")
    emit(
        {
            "kind": "parameters",
            "torch_parameters": torch_count,
            "keras_parameters": keras_count,
            "match": match,
        }
    )

    load, waited = wait_for_quiet(args.max_load, args.max_wait)
    print(f"load before timing {load} (waited {waited:.0f}s)", flush=True)
    print(
        f"\nsearch step: batch {args.batch}+{args.batch}, {args.layers} cells, C={args.channels}, "
        f"pibconv, {args.threads} threads, none "
        f"{'skipped' if args.skip_none else 'computed'}"
    )
    header = (
        f"{'order':>6} {'img/s med':>9} {'min':>7} {'max':>7} {'s/step':>7} "
        f"{'CPU s/step':>10} {'RSS MB':>7} {'others':>6} {'load':>5}"
    )
    print(header, flush=True)
    failed = False
    for order in [v for v in args.orders.split(",") if v]:
        warmup = args.warmup if args.warmup is not None else (2 if order == "first" else 1)
        steps = args.steps if args.steps is not None else (7 if order == "first" else 4)
        extra = [f"--worker={order}", f"--warmup={warmup}", f"--steps={steps}", *common]
        extra += [f"--threads={args.threads}", f"--seed={args.seed}", f"--lr={args.lr}"]
        extra += [f"--weight-decay={args.weight_decay}", f"--grad-clip={args.grad_clip}"]
        extra += [f"--arch-lr={args.arch_lr}", f"--arch-weight-decay={args.arch_weight_decay}"]
        if args.skip_none:
            extra.append("--skip-none")
        load_before = load_average()
        r = subprocess_json(__file__, extra)
        if r is None:
            failed = True
            print(f"{order:>6} failed", flush=True)
            continue
        r["load_average_before"] = load_before
        emit(r)
        others = r["other_processes_cpu_cores"]
        shown = "-" if others is None else f"{others:.2f}"
        print(
            f"{order:>6} {r['images_per_s_median']:>9.2f} {r['images_per_s_min']:>7.2f} "
            f"{r['images_per_s_max']:>7.2f} {r['step_s_median']:>7.2f} "
            f"{r['cpu_s_per_step_median']:>10.2f} {r['peak_rss_mb']:>7.0f} {shown:>6} "
            f"{load_average()[0]:>5.2f}",
            flush=True,
        )
    print(f"\nload average at the end {load_average()}; appended records to {output}")
    return 1 if failed or match is False else 0


if __name__ == "__main__":
    sys.exit(main())
