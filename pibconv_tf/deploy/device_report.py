"""Device report: what a device owner needs to know before shipping each TFLite model.

`device_report` writes `device_report.json` and `device_report.md` beside the models. For
each `.tflite` file:

- every operator (name, count), whether it is a TFLite builtin (a custom or Select TF op
  is not), how many of its nodes LiteRT's default XNNPACK delegate takes, and whether
  TensorFlow Lite Micro has a kernel for it (`microcontroller.TFLM_BUILTIN_OPS`);
- whether the model runs on TensorFlow Lite Micro (every operator available), and which
  operators are missing;
- the file size, the activation memory (a tensor arena estimate) and batch latency with
  LiteRT at 1, 2 and 4 threads.

How each figure is found:

- XNNPACK, measured: LiteRT applies its default delegate (XNNPACK on CPUs) when the
  interpreter allocates its tensors, and appends one DELEGATE node per partition it takes
  after the model's own nodes, with the partition's boundary tensors as inputs and outputs.
  A model node belongs to a partition if it is reached walking back from the partition's
  outputs without crossing its inputs. (`tf.lite.experimental.Analyzer` lists operators and
  checks GPU compatibility only, so it is not used.)
- Activation memory, estimated from the flatbuffer and the interpreter without delegates:
  tensors with no constant buffer are activations; in execution order, a tensor lives from
  the operator that writes it (graph inputs: from the start) to the last operator that reads
  it (graph outputs: to the end). The peak over operators of the live bytes is the estimate
  of the arena an ideal planner needs; the sum of all activation bytes is the upper bound of
  a planner that reuses nothing. TensorFlow Lite Micro's arena adds its own bookkeeping and
  kernels' scratch buffers: measure it on the device with `arena_used_bytes()`.
- Latency: `latency.time_tflite` (LiteRT with XNNPACK, random pixels, `invoke()` only),
  process CPU time beside the wall clock.

Only the first subgraph (the model's main graph) is inspected.

Example:
```python
report = device_report({"tflite_int8": "runs/export/model_int8.tflite"}, runs=50)
print(format_markdown(report))
```
"""

import collections
import json
import pathlib

import numpy as np
from ai_edge_litert import interpreter as litert
from ai_edge_litert import schema_py_generated as schema

from pibconv_tf import files
from pibconv_tf.deploy import latency, microcontroller

JSON = "device_report.json"
MARKDOWN = "device_report.md"
DEFAULT_THREADS = (1, 2, 4)
DELEGATE = "DELEGATE"
_BUILTIN_NAMES = frozenset(
    name for name in vars(schema.BuiltinOperator) if not name.startswith("_") and name != "CUSTOM"
)
# (key, header, width, format): the latency table, also printed by edge/run_tflite.py.
LATENCY_COLUMNS = (
    ("threads", "threads", 8, "d"),
    ("median_ms", "median ms", 11, ".3f"),
    ("p90_ms", "p90 ms", 9, ".3f"),
    ("mean_ms", "mean ms", 9, ".3f"),
    ("min_ms", "min ms", 9, ".3f"),
    ("cpu_ms", "CPU ms", 9, ".3f"),
    ("runs", "runs", 6, "d"),
)
XNNPACK_METHOD = (
    "measured: model nodes inside the DELEGATE partitions LiteRT's default XNNPACK "
    "delegate creates at allocate_tensors()"
)
MEMORY_METHOD = (
    "non-constant tensors; peak = max over operators (execution order) of the bytes of "
    "tensors live from their producer to their last reader; upper bound = sum of all"
)
TFLM_SOURCE = (
    "builtin kernels registered by tflite::MicroMutableOpResolver "
    "(tensorflow/lite/micro/micro_mutable_op_resolver.h, 2025 revision)"
)
TFLM_TYPES = (
    "Operators only, not data types: ship the full-integer model_int8.tflite (or float32) "
    "to TensorFlow Lite Micro; the fp16 and dynamic-range models rely on float16 weights "
    "and hybrid kernels of LiteRT's CPU runtime."
)
RELU_ALTERNATIVE = (
    "GELU has no TensorFlow Lite Micro kernel (an open request, tensorflow/tflite-micro "
    "issue #3218). A network that uses ReLU only, e.g. the DARTS_V2 genotype, runs there if "
    "it is trained as such (apps.train --genotype=DARTS_V2); replacing GELU by ReLU in "
    "trained weights changes what the network computes, so no such swap is offered."
)


def _content(model):
    return model if isinstance(model, bytes) else pathlib.Path(model).read_bytes()


def _interpreter(content, delegates):
    kwargs = {}
    if not delegates:
        kwargs["experimental_op_resolver_type"] = (
            litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    interpreter = litert.Interpreter(model_content=content, num_threads=1, **kwargs)
    interpreter.allocate_tensors()
    return interpreter


def graph(content):
    """The main graph in execution order: {"ops": [(name, inputs, outputs)], "bytes":
    {tensor: bytes}, "constant": set of tensors with data in the file, "inputs", "outputs"}."""
    interpreter = _interpreter(content, delegates=False)
    wrapper = interpreter._interpreter
    ops = [
        (
            wrapper.NodeName(i),
            [t for t in wrapper.NodeInputs(i) if t >= 0],
            [t for t in wrapper.NodeOutputs(i) if t >= 0],
        )
        for i in range(wrapper.NumNodes())
    ]
    sizes = {}
    for details in interpreter.get_tensor_details():
        shape = [int(d) for d in details["shape"]]
        sizes[details["index"]] = int(np.prod(shape)) * np.dtype(details["dtype"]).itemsize
    flat = schema.Model.GetRootAs(content, 0)
    subgraph = flat.Subgraphs(0)
    constant = set()
    for index in range(subgraph.TensorsLength()):
        buffer = flat.Buffers(subgraph.Tensors(index).Buffer())
        # Buffer 0 is the empty sentinel; large models keep data at an offset past the
        # flatbuffer instead of inline.
        if buffer is not None and (buffer.DataLength() > 0 or buffer.Offset() > 1):
            constant.add(index)
    return {
        "ops": ops,
        "bytes": sizes,
        "constant": constant,
        "inputs": [int(t) for t in subgraph.InputsAsNumpy()],
        "outputs": [int(t) for t in subgraph.OutputsAsNumpy()],
    }


def activation_memory(ops, sizes, constant, inputs, outputs):
    """{"peak_bytes", "upper_bound_bytes", "peak_op"} of the non-constant tensors of `ops`
    [(name, inputs, outputs)] run in order (see the module docstring)."""
    last_op = max(len(ops) - 1, 0)
    first, last = {}, {}
    for tensor in inputs:
        first[tensor], last[tensor] = 0, 0
    for index, (_, reads, writes) in enumerate(ops):
        for tensor in writes:
            first.setdefault(tensor, index)
            last[tensor] = max(last.get(tensor, index), index)
        for tensor in reads:
            first.setdefault(tensor, 0)  # read before any write: a graph input
            last[tensor] = index
    for tensor in outputs:
        first.setdefault(tensor, last_op)
        last[tensor] = last_op
    live = {t for t in first if t not in constant}
    usage = np.zeros(len(ops) or 1, np.int64)
    for tensor in live:
        usage[first[tensor] : last[tensor] + 1] += sizes.get(tensor, 0)
    peak_op = int(usage.argmax())
    return {
        "peak_bytes": int(usage[peak_op]),
        "upper_bound_bytes": int(sum(sizes.get(t, 0) for t in live)),
        "peak_op": f"#{peak_op} {ops[peak_op][0]}" if ops else None,
    }


def xnnpack_nodes(content):
    """(indices of the model nodes XNNPACK takes, its partition count), measured (see the
    module docstring)."""
    wrapper = _interpreter(content, delegates=True)._interpreter
    names = [wrapper.NodeName(i) for i in range(wrapper.NumNodes())]
    first = names.index(DELEGATE) if DELEGATE in names else len(names)
    producer = {t: i for i in range(first) for t in wrapper.NodeOutputs(i)}
    taken = set()
    for partition in range(first, len(names)):
        boundary = set(wrapper.NodeInputs(partition))
        pending = list(wrapper.NodeOutputs(partition))
        while pending:
            tensor = pending.pop()
            node = producer.get(tensor)
            if tensor in boundary or node is None or node in taken:
                continue
            taken.add(node)
            pending.extend(wrapper.NodeInputs(node))
    return taken, len(names) - first


def operator_rows(ops, delegated):
    """One row per operator name, most frequent first: count, builtin, XNNPACK, TFLM."""
    counts = collections.Counter(name for name, _, _ in ops)
    taken = collections.Counter(ops[i][0] for i in delegated)
    rows = []
    for name, count in counts.most_common():
        tflm = name in microcontroller.TFLM_BUILTIN_OPS
        rows.append(
            {
                "op": name,
                "count": count,
                "builtin": name in _BUILTIN_NAMES,
                "xnnpack_nodes": taken[name],
                "xnnpack": _share(taken[name], count),
                "tflite_micro": tflm,
                "tflite_micro_resolver": microcontroller.resolver_method(name) if tflm else None,
            }
        )
    return rows


def _share(part, whole):
    return "yes" if part == whole else "no" if part == 0 else f"{part} of {whole}"


def latency_rows(path, threads=DEFAULT_THREADS, runs=50, warmup=5):
    """Batch latency of one model per LiteRT thread count (`LATENCY_COLUMNS` keys)."""
    rows = []
    for count in threads:
        timing = latency.time_tflite(path, count, runs, warmup)
        wall = np.asarray(timing["seconds"]) * 1e3
        cpu = np.asarray(timing["cpu_seconds"]) * 1e3
        rows.append(
            {
                "threads": int(count),
                "median_ms": float(np.median(wall)),
                "p90_ms": float(np.percentile(wall, 90)),
                "mean_ms": float(wall.mean()),
                "min_ms": float(wall.min()),
                "cpu_ms": float(np.median(cpu)),
                "runs": int(runs),
                "warmup": int(warmup),
                "batch_size": timing["batch_size"],
            }
        )
    return rows


def model_report(path, threads=DEFAULT_THREADS, runs=50, warmup=5):
    """The report of one `.tflite` file; `runs` 0 skips latency."""
    content = _content(path)
    model = graph(content)
    delegated, partitions = xnnpack_nodes(content)
    operators = operator_rows(model["ops"], delegated)
    missing = microcontroller.tflm_missing(row["op"] for row in operators)
    memory = activation_memory(
        model["ops"], model["bytes"], model["constant"], model["inputs"], model["outputs"]
    )
    constant_bytes = sum(model["bytes"].get(t, 0) for t in model["constant"])
    notes = [RELU_ALTERNATIVE] if "GELU" in missing else []
    foreign = [row["op"] for row in operators if not row["builtin"]]
    if foreign:
        notes.append(f"Not TFLite builtins (need custom or Select TF kernels): {foreign}.")
    return {
        "file": pathlib.Path(path).name,
        "bytes": len(content),
        "nodes": len(model["ops"]),
        "operators": operators,
        "xnnpack": {
            "delegated_nodes": len(delegated),
            "nodes": len(model["ops"]),
            "partitions": partitions,
            "method": XNNPACK_METHOD,
        },
        "tflite_micro": {"runs": not missing, "missing": missing, "source": TFLM_SOURCE},
        "memory": {**memory, "constant_bytes": int(constant_bytes), "method": MEMORY_METHOD},
        "latency": latency_rows(path, threads, runs, warmup) if runs else [],
        "notes": notes,
    }


def device_report(models, output_dir=None, threads=DEFAULT_THREADS, runs=50, warmup=5):
    """Reports on each TFLite model and writes `device_report.json` and `.md`.

    Args:
        models: {name: path} of `.tflite` files, or a list of paths (named by file stem).
        output_dir: where the two files go (None: the first model's directory).
        threads: LiteRT thread counts to time.
        runs, warmup: timed and untimed `invoke()` calls per thread count (runs 0: no
            latency).

    Returns:
        {"models": {name: `model_report`}, "latency_columns": [...]}.
    """
    if not isinstance(models, dict):
        models = {pathlib.Path(p).stem: p for p in models}
    report = {
        "models": {
            name: model_report(path, threads, runs, warmup) for name, path in models.items()
        },
        "latency_columns": [key for key, *_ in LATENCY_COLUMNS],
    }
    if models:
        directory = pathlib.Path(output_dir or pathlib.Path(next(iter(models.values()))).parent)
        # Both texts first, then each file replaced whole: an error leaves the old pair.
        texts = {JSON: json.dumps(report, indent=2) + "\n", MARKDOWN: format_markdown(report)}
        for name, text in texts.items():
            files.write_text_atomic(directory / name, text)
    return report


def format_latency(rows, name):
    """Latency rows as the text table that `edge/run_tflite.py --benchmark` also prints."""
    width = max(len(name), 5) + 2
    header = f"{'model':<{width}}" + "".join(f"{h:>{w}}" for _, h, w, _ in LATENCY_COLUMNS)
    lines = [header]
    for row in rows:
        cells = "".join(f"{row[key]:>{w}{spec}}" for key, _, w, spec in LATENCY_COLUMNS)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def format_markdown(report):
    """The readable report: a summary table, then per model its operators and latency."""
    summary = []
    for name, model in report["models"].items():
        tflm = (
            "yes"
            if model["tflite_micro"]["runs"]
            else "no: " + ", ".join(model["tflite_micro"]["missing"])
        )
        xnn = model["xnnpack"]
        summary.append(
            (
                name,
                model["file"],
                f"{model['bytes']:,}",
                f"{xnn['delegated_nodes']} of {xnn['nodes']} ({xnn['partitions']} partitions)",
                tflm,
                f"{model['memory']['peak_bytes']:,}",
                f"{model['memory']['upper_bound_bytes']:,}",
            )
        )
    lines = ["# Device report", ""]
    header = ("model", "file", "bytes", "XNNPACK nodes", "TFLite Micro", "arena est. B")
    lines += _table((*header, "activations sum B"), summary)
    lines += ["", f"- XNNPACK: {XNNPACK_METHOD}.", f"- Arena: {MEMORY_METHOD}."]
    lines += [f"- TFLite Micro: {TFLM_SOURCE}. {TFLM_TYPES}", ""]
    for name, model in report["models"].items():
        lines += [f"## {name} (`{model['file']}`)", ""]
        rows = [
            (
                row["op"],
                row["count"],
                "yes" if row["builtin"] else "NO (custom)",
                row["xnnpack"],
                row["tflite_micro_resolver"] or "no kernel",
            )
            for row in model["operators"]
        ]
        header = ("operator", "count", "TFLite builtin", "XNNPACK", "TFLite Micro")
        lines += _table(header, rows)
        memory = model["memory"]
        lines += [
            "",
            f"Peak activation memory {memory['peak_bytes']:,} B at {memory['peak_op']}; all "
            f"activations {memory['upper_bound_bytes']:,} B; weights and constants "
            f"{memory['constant_bytes']:,} B.",
        ]
        lines += [f"\n{note}" for note in model["notes"]]
        if model["latency"]:
            header = [h for _, h, _, _ in LATENCY_COLUMNS]
            rows = [
                [format(row[key], spec) for key, _, _, spec in LATENCY_COLUMNS]
                for row in model["latency"]
            ]
            lines += ["", f"Latency, batch {model['latency'][0]['batch_size']}:", ""]
            lines += _table(header, rows)
        lines.append("")
    return "\n".join(lines)


def format_summary(report):
    """One line per model for the export's console output."""
    lines = [f"{'model':<22}{'MB':>7}{'XNNPACK':>10}{'arena KB':>10}  TFLite Micro"]
    for name, model in report["models"].items():
        xnn = model["xnnpack"]
        missing = model["tflite_micro"]["missing"]
        lines.append(
            f"{name:<22}{model['bytes'] / 1e6:7.2f}{xnn['delegated_nodes']:>5}/{xnn['nodes']:<4}"
            f"{model['memory']['peak_bytes'] / 1024:10.1f}  "
            f"{'yes' if not missing else 'no: ' + ', '.join(missing)}"
        )
    return "\n".join(lines)
