"""Test processes that start with torch, DeepSpeed and open_clip already imported.

A ``clip-train`` process spends ~11 s importing before it reads its config, most of a short test
run, and the matrix and resume tests start dozens of them. Here every process is forked from one
server (multiprocessing's forkserver, started once per test session) that imported those modules
once. The process is still a real one of its own (its pid, signals, exit code, gloo sockets); it
gets the command line, environment, working directory and output file it would have had as a
``subprocess``, and runs the same entry point (``python -m MODULE`` or ``python SCRIPT``) as
``__main__``. ``clip_train.cli`` itself is not preloaded, so it runs exactly as the console script.

``dist_harness`` uses the same server for its ranks.
"""
import atexit
import multiprocessing
import os
import runpy
import sys
from pathlib import Path

PRELOAD = ["torch", "torch.distributed", "deepspeed", "open_clip", "clip_train.engine.trainer", "clip_train.eval"]
CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(PRELOAD)


def _run(argv: list[str], env: dict, cwd: str, log_path: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            runpy.run_path(argv[1], run_name="__main__")
    finally:  # multiprocessing ends its processes with os._exit: run what a normal interpreter exit runs
        atexit._run_exitfuncs()


def start(command: list[str], log_path: Path, env: dict | None = None):
    """Start ``command`` (``[sys.executable, "-m", MODULE, ...]`` or ``[sys.executable, SCRIPT, ...]``);
    its stdout and stderr go to ``log_path``. Returns the ``multiprocessing`` process (``.pid``,
    ``.join``, ``.exitcode``: negative for a signal, as ``subprocess`` reports it)."""
    if command[0] != sys.executable or len(command) < 2:
        raise ValueError(f"not a command of this interpreter: {command[:3]}")
    process = CONTEXT.Process(target=_run, args=(command, dict(os.environ if env is None else env), os.getcwd(),
                                                 str(log_path)))
    process.start()
    return process


def wait(process, timeout: float) -> int:
    """The exit code; a process still running after ``timeout`` seconds is killed (and reported as -9)."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(10)
    return process.exitcode


def tail(log_path: Path, chars: int = 3000) -> str:
    return Path(log_path).read_text(errors="replace")[-chars:] if Path(log_path).exists() else ""
