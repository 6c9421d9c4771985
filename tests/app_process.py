"""Runs `python -m apps.X ...` for the tests in a fraction of a second instead of ~7 s.

Most of an app's start-up is importing TensorFlow and Keras (about 5.5 s of 7 on 2 cores),
and the suite starts apps about a hundred times. `run_app` hands each run to a zygote: one
process per test worker that has imported TensorFlow and Keras and done nothing else (no
op, no thread but the main one), and forks a child per run. The child takes the run's
working directory, environment, argv and stdout/stderr files, and executes the module as
`python -m` does (`runpy`, `__main__`), so the app sees a fresh process: its own modules of
this repository, flags, strategy and devices. Runs whose environment changes what an import
reads (another Keras backend, XLA or oneDNN flags) start a real interpreter instead, as does
any run when the zygote cannot start.

`run_app` returns a `subprocess.CompletedProcess` (returncode, stdout, stderr as text).
"""

import atexit
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading

REPO = pathlib.Path(__file__).resolve().parents[1]
# Read while TensorFlow or Keras import: a run that sets one otherwise gets a real process.
_IMPORT_TIME = ("KERAS_BACKEND", "TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS", "TF_XLA_FLAGS")
_ZYGOTE_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
_lock = threading.Lock()
_zygote = None


def _environment(env):
    return dict(os.environ if env is None else env)


def _forkable(env):
    zygote = {**os.environ, **_ZYGOTE_ENVIRONMENT}
    defaults = {"KERAS_BACKEND": "tensorflow"}  # Keras' default when unset
    return all(
        env.get(name, defaults.get(name)) == zygote.get(name, defaults.get(name))
        for name in _IMPORT_TIME
    )


def _start():
    global _zygote
    if _zygote is None:
        _zygote = subprocess.Popen(
            [sys.executable, __file__],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **_ZYGOTE_ENVIRONMENT},
        )
        atexit.register(_stop)
        if _zygote.stdout.readline().strip() != "ready":
            _zygote = None
    return _zygote


def _stop():
    if _zygote is not None and _zygote.poll() is None:
        _zygote.stdin.close()
        _zygote.wait(timeout=30)


def run_app(module, *args, env=None, cwd=REPO, timeout=600):
    """`python -m module *args` in `cwd` with `env` (default: this process'), as a
    `subprocess.CompletedProcess` with text output; raises `subprocess.TimeoutExpired`."""
    env = _environment(env)
    command = [sys.executable, "-m", module, *args]
    with _lock:
        zygote = _start() if _forkable(env) else None
        if zygote is None:
            return subprocess.run(
                command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
            )
        with tempfile.TemporaryDirectory() as directory:
            out, err = pathlib.Path(directory, "stdout"), pathlib.Path(directory, "stderr")
            request = {
                "module": module,
                "args": list(args),
                "env": env,
                "cwd": str(cwd),
                "stdout": str(out),
                "stderr": str(err),
            }
            zygote.stdin.write(json.dumps(request) + "\n")
            zygote.stdin.flush()
            pid = json.loads(zygote.stdout.readline())["pid"]
            expired = threading.Event()

            def kill():
                expired.set()
                os.kill(pid, 9)

            timer = threading.Timer(timeout, kill)
            timer.start()
            try:
                returncode = json.loads(zygote.stdout.readline())["returncode"]
            finally:
                timer.cancel()
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    if expired.is_set():
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    return subprocess.CompletedProcess(command, returncode, stdout, stderr)


def _child(request):
    """Becomes `python -m request["module"]` in this forked process; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        # sys.stdout and sys.stderr write to descriptors 1 and 2 (flushed before the fork);
        # sys.stdin may hold read-ahead of the zygote's requests.
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (lives as long as the process)
        sys.argv = [request["module"], *request["args"]]
        sys.path[0] = request["cwd"]
        import runpy  # noqa: PLC0415

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # as the interpreter does: the traceback, status 1
        import traceback  # noqa: PLC0415

        traceback.print_exc()
        code = 1
    finally:
        # What the interpreter does at exit: the exit functions (an app's stderr filter
        # drains there), logging's handlers, the streams.
        atexit._run_exitfuncs()
        import logging  # noqa: PLC0415

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):  # a closed stream: nothing to flush
                stream.flush()
        os._exit(code)


def _serve():
    """The zygote: imports TensorFlow and Keras, then forks one child per request line."""
    import keras  # noqa: F401, PLC0415
    import tensorflow  # noqa: F401, PLC0415

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    _serve()
