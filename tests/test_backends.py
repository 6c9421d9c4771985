"""Keras' JAX backend (issue 16): the same steps as TensorFlow's, and the apps end to end.

Each JAX program runs in its own process (KERAS_BACKEND is read when Keras is imported;
this test process runs TensorFlow). Their compiled steps go to one JAX compilation cache
of the session, which a resumed run reads.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pibconv_tf import runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "PYTHONPATH": str(REPO),  # `tests` here, not a package of that name installed
    }


def _start(env, backend, *command):
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO,
        env={**env, "KERAS_BACKEND": backend},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process, timeout=900):
    stdout, stderr = process.communicate(timeout=timeout)
    # Without the runtimes' info and warning lines (I0000 ...), which fill the tail otherwise.
    told = [line for line in stderr.splitlines() if not re.match(r"[IW]\d{4} ", line)]
    if process.returncode != 0:
        command = " ".join(map(str, process.args))
        pytest.fail(f"{command} ended with {process.returncode}:\n" + "\n".join(told)[-4000:])
    return stdout, stderr


def _groups(arrays, run, kind):
    return [arrays[k] for k in sorted(arrays.files) if k.startswith(f"{run}/{kind}/")]


@pytest.mark.slow
def test_search_and_training_steps_equal_tensorflows(env, tmp_path):
    """... and on JAX, the same steps with each batch split over two devices
    (`--strategy=mirrored` there: keras.distribution.DataParallel)."""
    outputs = {b: tmp_path / f"{b}.npz" for b in ("tensorflow", "jax", "parallel")}
    processes = [
        _start(env, "tensorflow", "-m", "tests.backend_steps", "steps", outputs["tensorflow"]),
        _start(env, "jax", "-m", "tests.backend_steps", "steps", outputs["jax"]),
    ]
    for process in processes:
        _finish(process)
    # XLA aborts the process when one device's thread reaches an all-reduce 40 s after the
    # other (its default); on a loaded 2-core machine the two host "devices" can be that far
    # apart, so the test allows them 15 minutes.
    two_devices = {
        **env,
        "XLA_FLAGS": " ".join(
            (
                "--xla_force_host_platform_device_count=2",
                "--xla_cpu_collective_call_terminate_timeout_seconds=900",
                "--xla_cpu_collective_timeout_seconds=900",
            )
        ),
    }
    _finish(
        _start(two_devices, "jax", "-m", "tests.backend_steps", "parallel", outputs["parallel"])
    )
    tf, jax, parallel = (np.load(outputs[b]) for b in ("tensorflow", "jax", "parallel"))
    for run in ("first", "train"):
        assert jax[f"{run}/devices"] == 1 and parallel[f"{run}/devices"] == 2
        np.testing.assert_allclose(parallel[f"{run}/loss"], jax[f"{run}/loss"], rtol=1e-5)
        for kind in ("alphas", "weights") if run != "train" else ("weights",):
            pairs = zip(_groups(jax, run, kind), _groups(parallel, run, kind), strict=True)
            for ours, theirs in pairs:
                np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)
    for run in ("first", "second", "train"):
        np.testing.assert_array_equal(tf[f"{run}/paths"], jax[f"{run}/paths"])
        np.testing.assert_allclose(jax[f"{run}/loss"], tf[f"{run}/loss"], rtol=1e-5)
        kinds = ("alphas", "weights") if run != "train" else ("weights",)
        for kind in kinds:
            pairs = zip(_groups(tf, run, kind), _groups(jax, run, kind), strict=True)
            for ours, theirs in pairs:
                np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax["first/grad_norm"], tf["first/grad_norm"], rtol=1e-5)
    # The second order moved the alphas elsewhere than the first (it is not a no-op).
    moved = max(
        np.abs(a - b).max()
        for a, b in zip(
            _groups(jax, "first", "alphas"), _groups(jax, "second", "alphas"), strict=True
        )
    )
    assert moved > 1e-5


@pytest.mark.slow
def test_exact_hessian_vector_product_agrees_with_darts_finite_difference(env, tmp_path):
    out = tmp_path / "hvp.json"
    _finish(_start(env, "jax", "-m", "tests.backend_steps", "hvp", str(out)))
    result = {k: np.array(v) for k, v in json.loads(out.read_text()).items()}
    exact, finite = result["exact"], result["finite_difference"]
    assert np.linalg.norm(exact) > 1e-2
    # DARTS' central difference (radius 0.01 / ||v||) is accurate to about 1e-3 here.
    assert np.linalg.norm(exact - finite) < 1e-2 * np.linalg.norm(exact)
    # ... and a product with another vector is far from it.
    assert np.linalg.norm(result["other_vector"] - exact) > 0.3 * np.linalg.norm(exact)


_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc, runpy, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "torch", "tf_keras", "keras_cv",
                                      "tensorflow_datasets", "tf_keras_vis"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, Blocked())
    sys.argv = ["apps.benchmark", *sys.argv[1:]]
    runpy.run_module("apps.benchmark", run_name="__main__")
    """
)


@pytest.mark.slow
def test_benchmark_measures_jax_steps_without_tensorflow(env, tmp_path):
    output = tmp_path / "jax.jsonl"
    process = _start(
        env,
        "jax",
        "-c",
        _WITHOUT_TENSORFLOW,
        "--backend=jax",
        "--what=search_step,train_step",
        "--noisolate",
        "--order=first",
        "--layers=1",
        "--init_channels=4",
        "--batch_size=4",
        "--search_layers=3",
        "--search_nodes=1",
        "--search_init_channels=4",
        "--search_batch_size=4",
        "--image_size=8",
        "--repeats=2",
        "--warmup=1",
        f"--output={output}",
    )
    stdout, _ = _finish(process)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    done = [r for r in records if r.get("status") == "ok"]
    assert [r["what"] for r in done] == ["search_step", "train_step"]
    for record in done:
        assert record["backend"] == "jax" and record["accelerator"] == "CPU"
        assert record["compile_seconds"] > 0 and record["median"] > 0
        assert record["unit"] == "images/s" and record["device"]
        assert record["versions"]["jax"]  # the JAX measured, recorded
    assert "train PIBCONV L=1 C=4 float32 xla [jax]" in stdout


_SEARCH = [
    "-m",
    "apps.search",
    "--backend=jax",
    "--dataset=digits",
    "--image_size=8",
    "--layers=3",
    "--nodes=1",
    "--init_channels=4",
    "--batch_size=8",
    "--steps_per_epoch=3",
    "--epochs=2",
    "--verbose=0",
]
_TRAIN = [
    "-m",
    "apps.train",
    "--backend=jax",
    "--dataset=digits",
    "--image_size=8",
    "--layers=1",
    "--init_channels=4",
    "--batch_size=8",
    "--cutout_length=4",
    "--drop_path_prob=0.3",
    "--steps_per_epoch=3",
    "--epochs=2",
    "--verbose=0",
]


def _kill_after_first_epoch(env, command, model_dir):
    """Starts `command`, SIGKILLs it once epoch 1's checkpoint exists, then resumes it."""
    process = _start(env, "jax", *command, f"--model_dir={model_dir}")
    checkpoint = model_dir / "checkpoints" / "epoch-0001.npz"
    start = time.monotonic()
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() - start < 900, "no checkpoint of epoch 1"
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=60)
    lines = (model_dir / runs.METRICS).read_text().splitlines()
    assert len(lines) <= 1, "killed too late: epoch 2 had ended"
    resumed = _start(
        env, "jax", *command[:2], "--backend=jax", "--resume", f"--model_dir={model_dir}"
    )
    stdout, stderr = _finish(resumed)
    assert "Backend: jax on the CPU." in stdout
    assert "Taking over" in stderr  # the killed run's lock
    lines = (model_dir / runs.METRICS).read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]
    assert epochs == [1, 2]
    return stdout


@pytest.mark.slow
def test_digits_search_on_jax_writes_its_outputs_and_resumes_after_a_kill(env, tmp_path):
    model_dir = tmp_path / "search"
    _kill_after_first_epoch(env, _SEARCH, model_dir)
    for name in (runs.GENOTYPE, runs.GENOTYPES, runs.ALPHAS, runs.CONFIG, "checkpoints"):
        assert (model_dir / name).exists(), name
    assert len((model_dir / runs.GENOTYPES).read_text().splitlines()) == 2
    genotype = json.loads((model_dir / runs.GENOTYPE).read_text())
    assert genotype["search_space"] == "pibconv" and len(genotype["normal"]) == 2
    alphas = np.load(model_dir / runs.ALPHAS)
    weights = [alphas[k] for k in alphas.files if alphas[k].dtype.kind == "f"]
    assert weights and all(np.isfinite(w).all() for w in weights)


@pytest.mark.slow
def test_digits_training_on_jax_resumes_and_its_model_exports_on_tensorflow(env, tmp_path):
    model_dir = tmp_path / "train"
    _kill_after_first_epoch(env, _TRAIN, model_dir)
    result = json.loads((model_dir / runs.RESULT).read_text())
    assert 0.0 <= result["test_accuracy"] <= 1.0
    export = _start(
        env,
        "tensorflow",
        "-m",
        "apps.export",
        f"--model={model_dir / runs.MODEL}",
        f"--output_dir={tmp_path / 'export'}",
        "--formats=tflite_fp32",
        "--parity_images=16",
        "--benchmark_runs=0",
    )
    _finish(export)
    assert (tmp_path / "export" / "model_fp32.tflite").stat().st_size > 1000
