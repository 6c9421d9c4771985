"""Timing loops of the benchmarks: warm-up, auto-ranged repeats, wall and process CPU time.

This module imports neither TensorFlow nor Keras, so that `time_tflite` runs in a process
that holds only LiteRT and numpy, as the edge device does.
"""

import math
import time

import numpy as np


def time_calls(call, repeats, warmup=1, min_repeat_seconds=0.0):
    """Times `call()` after warm-up; each repeat may run it several times.

    The first call (tracing, compilation, allocation) is timed apart, then `warmup - 1`
    more run untimed. With `min_repeat_seconds` > 0, every repeat runs `call` as many times
    as fit in that long (judged on the last warm-up call) and reports the time per call, so
    millisecond calls are not dominated by timer and scheduler noise.

    Args:
        call: a function whose return means the work is done (e.g. it fetches a result).
        repeats: timed repeats.
        warmup: untimed calls, the first included (at least 1).
        min_repeat_seconds: target duration of one repeat.

    Returns:
        {"seconds": per-call wall seconds of each repeat, "cpu_seconds": per-call process
        CPU seconds of each repeat (all threads), "calls_per_repeat", "first_call_seconds"}.
    """
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    last = first
    for _ in range(max(warmup, 1) - 1):
        start = time.perf_counter()
        call()
        last = time.perf_counter() - start
    calls = 1
    if min_repeat_seconds > 0 and last > 0:
        calls = max(1, math.ceil(min_repeat_seconds / last))
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            call()
        seconds.append((time.perf_counter() - wall) / calls)
        cpu_seconds.append((time.process_time() - cpu) / calls)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "calls_per_repeat": calls,
        "first_call_seconds": first,
    }


def quantize_pixels(pixels, details):
    """Raw 0..255 pixels as the model's input tensor takes them: float, quantized integers,
    or (scale 0: not quantized) the integers themselves.

    The one copy for the package (deploy/tflite.py uses it); edge/run_tflite.py keeps its own,
    as the edge runner ships alone.
    """
    dtype = np.dtype(details["dtype"])
    scale, zero_point = details["quantization"]
    if dtype.kind == "f" or scale == 0:
        return pixels.astype(dtype)
    info = np.iinfo(dtype)
    values = np.round(pixels.astype(np.float32) / scale + zero_point)
    return np.clip(values, info.min, info.max).astype(dtype)


def time_tflite(path, threads, repeats, warmup=1, min_repeat_seconds=0.0, seed=0):
    """Times LiteRT's `invoke()` on random pixels at the model's batch size.

    Args:
        path: the `.tflite` file.
        threads: LiteRT CPU threads (XNNPACK, the default delegate, uses them).
        repeats, warmup, min_repeat_seconds: see `time_calls`.
        seed: seed of the random pixels.

    Returns:
        `time_calls`' dict plus "batch_size" and "input_dtype".
    """
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 (optional dependency)

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()[0]
    shape = tuple(int(d) for d in details["shape"])
    pixels = np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)
    interpreter.set_tensor(details["index"], quantize_pixels(pixels, details))
    timing = time_calls(interpreter.invoke, repeats, warmup, min_repeat_seconds)
    return {**timing, "batch_size": shape[0], "input_dtype": np.dtype(details["dtype"]).name}
