"""Build the launcher argv (deepspeed or torchrun) and the ``.deepspeed_env`` that forwards variables."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from .hostfile import LaunchError

TRAIN_MODULE = "clip_train.cli"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def deepspeed_command(train_args: Sequence[str], *, hostfile: str | None = None, num_nodes: int | None = None,
                      num_gpus: int | None = None, include: str = "", exclude: str = "",
                      master_addr: str | None = None, master_port: int = 29500,
                      ssh_check: bool = True) -> list[str]:
    """``deepspeed [--hostfile ...] ... --no_local_rank --module clip_train.cli ARGS``.

    ``--no_local_rank`` because clip-train reads LOCAL_RANK from the environment and its parser
    would reject the ``--local_rank=N`` argument the launcher otherwise appends. The runner refuses
    ``--num_nodes/--num_gpus`` together with ``--include/--exclude``, so callers pass one or the other.
    ``ssh_check=False`` adds ``--no_ssh_check``: with a hostfile the runner first runs
    ``ssh FIRST_HOST hostname`` and stops when that fails, even when only one host is left to run on,
    which it then launches locally without ssh.
    """
    command = ["deepspeed"]
    if hostfile is not None:
        command += ["--hostfile", str(hostfile)]
    if num_nodes is not None:
        command += ["--num_nodes", str(num_nodes)]
    if num_gpus is not None:
        command += ["--num_gpus", str(num_gpus)]
    if include:
        command += ["--include", include]
    if exclude:
        command += ["--exclude", exclude]
    if master_addr:
        command += ["--master_addr", master_addr]
    if not ssh_check:
        command.append("--no_ssh_check")
    command += ["--master_port", str(master_port), "--no_local_rank", "--module", TRAIN_MODULE]
    return command + list(train_args)


def torchrun_command(train_args: Sequence[str], *, num_nodes: int, nproc_per_node: int | str,
                     master_addr: str, master_port: int) -> list[str]:
    """One torchrun per node; the c10d rendezvous on the master assigns node ranks, so the same
    command runs unchanged on every node."""
    return ["torchrun", "--nnodes", str(num_nodes), "--nproc_per_node", str(nproc_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{master_addr}:{master_port}",
            "-m", TRAIN_MODULE, *train_args]


def srun_per_node_prefix(hosts: Sequence[str]) -> list[str]:
    """Run one task on each chosen node of the allocation (torchrun then starts the per-GPU ranks).

    ``--nodelist`` pins the nodes so the rendezvous host (the first) is among them; one dead node
    ends the step instead of leaving the others waiting at a barrier.
    """
    return ["srun", "--nodes", str(len(hosts)), "--ntasks-per-node", "1", "--nodelist", ",".join(hosts),
            "--kill-on-bad-exit=1"]


def deepspeed_env_path(environ: Mapping[str, str]) -> Path:
    """Where the deepspeed runner looks: ``./$DS_ENV_FILE`` (default ``.deepspeed_env``), read at launch
    time from the current directory (it also reads ``~/.deepspeed_env``; the current one is read last)."""
    return Path(".") / environ.get("DS_ENV_FILE", ".deepspeed_env")


def forwarded_variables(environ: Mapping[str, str], extra_names: Sequence[str] = ()) -> dict[str, str]:
    """NCCL_* settings, PYTHONPATH and the names asked for with ``--env`` (e.g. data paths).

    The remote nodes start from a fresh ssh login shell, so anything the run depends on must be
    named here; a requested name that is not set is an error rather than an empty value.
    """
    names = sorted(name for name in environ if name.startswith("NCCL_"))
    if "PYTHONPATH" in environ:
        names.append("PYTHONPATH")
    for name in extra_names:
        if not _ENV_NAME.match(name):
            raise LaunchError(f"--env {name!r}: not a valid variable name")
        if name not in environ:
            raise LaunchError(f"--env {name}: not set in the environment")
        if name not in names:
            names.append(name)
    return {name: _checked_value(name, environ[name]) for name in names}


def _checked_value(name: str, value: str) -> str:
    # The runner reads the file line by line, so a newline would split one variable into garbage.
    if "\n" in value or "\r" in value:
        raise LaunchError(f"cannot forward {name}: its value contains a newline")
    return value


def merge_deepspeed_env(existing_text: str, variables: Mapping[str, str], source: str) -> str:
    """Keep the entries already in the file (ours win on a clash) so we never drop a user's settings.

    Every line must be ``KEY=VALUE``: the runner splits each line on ``=`` and fails on anything else,
    blank lines included, so a bad existing line is reported here with its number.
    """
    merged: dict[str, str] = {}
    for number, line in enumerate(existing_text.splitlines(), start=1):
        key, sep, value = line.partition("=")
        if not sep or not _ENV_NAME.match(key.strip()):
            raise LaunchError(f"{source} line {number}: expected KEY=VALUE (the deepspeed runner fails on "
                              f"anything else), got {line!r}")
        merged[key.strip()] = value
    merged.update(variables)
    return "".join(f"{key}={value}\n" for key, value in merged.items())
