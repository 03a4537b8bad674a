"""``clip-launch``: turn a hostfile or SLURM allocation into a deepspeed (or torchrun) launch of clip-train."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .hostfile import LaunchError
from .command import (deepspeed_command, deepspeed_env_path, forwarded_variables, merge_deepspeed_env,
                      srun_per_node_prefix, torchrun_command)
from .hostfile import filter_resources, format_hostfile, parse_resource_spec, read_hostfile
from .slurm import default_hostfile_path, hosts_from_slurm, render_sbatch_script

PROG = "clip-launch"
EXAMPLE = "e.g. clip-launch --hostfile hosts -- --config configs/vit-b-32.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every bad invocation is one stderr line."""

    def error(self, message: str):
        raise LaunchError(message)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text!r}")
    return int(text)


def launch_parser() -> _Parser:
    parser = _Parser(prog=PROG, usage=f"{PROG} [options] -- CLIP_TRAIN_ARGS...  |  {PROG} sbatch-template [options]",
                     description="Launch clip-train on one or many nodes. Everything after '--' goes to clip-train.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="DeepSpeed hostfile ('host slots=N' lines); first host is the master")
    where.add_argument("--slurm", action="store_true", help="use this SLURM allocation (SLURM_JOB_NODELIST)")
    parser.add_argument("--hostfile-out", help="with --slurm: where to write the hostfile (default $TMPDIR)")
    parser.add_argument("--num-nodes", type=_positive_int, help="use the first N hosts (default: all)")
    parser.add_argument("--num-gpus", type=_positive_int, help="GPUs per node (default: the hostfile's slots)")
    parser.add_argument("--include", default="", help="deepspeed resource spec, e.g. 'host1:0,1@host2'")
    parser.add_argument("--exclude", default="", help="deepspeed resource spec of hosts/slots to leave out")
    parser.add_argument("--master-addr", help="address of rank 0 (default: the first host)")
    parser.add_argument("--master-port", type=_port, default=29500, help="rendezvous port (default 29500)")
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed",
                        help="deepspeed (its multi-node runner, over pdsh/ssh) or torchrun (default: deepspeed)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="also forward this environment variable to every node (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the files and command, run nothing")
    return parser


def sbatch_parser() -> _Parser:
    parser = _Parser(prog=f"{PROG} sbatch-template", description="Print a SLURM batch script for clip-train.")
    parser.add_argument("--nodes", type=_positive_int, default=2, metavar="N",
                        help="nodes to request (#SBATCH --nodes), an integer >= 1 (default: 2)")
    parser.add_argument("--gpus-per-node", type=_non_negative_int, default=8, metavar="N",
                        help="GPUs to request per node, an integer >= 0; 0: CPU nodes, one clip-train process "
                             "per node (default: 8)")
    parser.add_argument("--cpus-per-task", type=_positive_int, default=64, metavar="N",
                        help="CPUs for the one task per node, an integer >= 1 (default: 64)")
    parser.add_argument("--time", default="24:00:00", help="wall-clock limit, [D-]HH:MM:SS (default: 24:00:00)")
    parser.add_argument("--config", default="configs/vit-b-32.yaml", metavar="FILE",
                        help="the clip-train config YAML the script trains with (default: configs/vit-b-32.yaml)")
    parser.add_argument("--job-name", default="clip-train", metavar="NAME",
                        help="SLURM job name: letters, digits, '.', '_' or '-' (default: clip-train)")
    return parser


@dataclass
class LaunchPlan:
    """What a launch does: files written first, then one command; notes explain what the user must do."""

    command: list[str]
    files: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class HostPool:
    """The hosts of a multi-node launch and the hostfile deepspeed reads them from."""

    hosts: "OrderedDict[str, int]"
    hostfile: Path
    generated: bool  # True when we write the hostfile (from SLURM) rather than read the user's


def split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def resolve_hosts(options: argparse.Namespace, environ: Mapping[str, str]) -> HostPool | None:
    """The host pool from --hostfile or --slurm; None for a single-node launch."""
    if options.hostfile:
        return HostPool(read_hostfile(options.hostfile), Path(options.hostfile), generated=False)
    if options.slurm:
        hosts = hosts_from_slurm(environ, options.num_gpus)
        path = Path(options.hostfile_out) if options.hostfile_out else default_hostfile_path(environ)
        return HostPool(hosts, path, generated=True)
    return None


def first_hosts(pool: HostPool, num_nodes: int | None) -> "OrderedDict[str, int]":
    """The first N hosts (deepspeed's --num_nodes rule), with a clear error when there are fewer."""
    if num_nodes is None:
        return pool.hosts
    if num_nodes > len(pool.hosts):
        raise LaunchError(f"--num-nodes {num_nodes} but {pool.hostfile if not pool.generated else 'the allocation'} "
                          f"has only {len(pool.hosts)} host(s)")
    return OrderedDict(list(pool.hosts.items())[:num_nodes])


def gpus_for_every_host(hosts: Mapping[str, int], num_gpus: int | None) -> int | None:
    """--num-gpus when it fits every host; otherwise the common slot count, or None if hosts differ."""
    if num_gpus is not None:
        short = [host for host, slots in hosts.items() if slots < num_gpus]
        if short:
            raise LaunchError(f"--num-gpus {num_gpus} but host {short[0]} has only {hosts[short[0]]} slot(s)")
        return num_gpus
    counts = set(hosts.values())
    return counts.pop() if len(counts) == 1 else None


def check_options(options: argparse.Namespace, train_args: list[str], pool: HostPool | None) -> None:
    """Combinations that the launchers would reject late (or silently ignore) are refused up front."""
    if not train_args:
        raise LaunchError(f"no clip-train arguments: put them after '--', {EXAMPLE}")
    if options.hostfile_out and not options.slurm:
        raise LaunchError("--hostfile-out only applies with --slurm")
    if (options.include or options.exclude) and (options.num_nodes or options.num_gpus):
        raise LaunchError("--include/--exclude cannot be combined with --num-nodes/--num-gpus (deepspeed refuses it)")
    if options.include and options.exclude:
        raise LaunchError("--include and --exclude cannot be used together")
    if pool is None and options.num_nodes and options.num_nodes > 1:
        raise LaunchError(f"--num-nodes {options.num_nodes} needs --hostfile or --slurm to know the hosts")
    if pool is None and options.master_addr:
        raise LaunchError("--master-addr only applies to multi-node launches (--hostfile or --slurm)")
    if options.launcher == "torchrun" and (options.include or options.exclude):
        raise LaunchError("--include/--exclude are deepspeed launcher options; with torchrun use --num-nodes/--num-gpus")


def deepspeed_plan(options: argparse.Namespace, train_args: list[str], pool: HostPool | None,
                   environ: Mapping[str, str]) -> LaunchPlan:
    variables = forwarded_variables(environ, options.env)
    if pool is None:
        for flag, spec in (("--include", options.include), ("--exclude", options.exclude)):
            unknown = [host for host in parse_resource_spec(spec, flag) if host != "localhost"] if spec else []
            if unknown:
                raise LaunchError(f"{flag}: unknown host {unknown[0]!r}; without --hostfile the only host is localhost")
        # The local launcher inherits this environment, so nothing needs forwarding.
        return LaunchPlan(deepspeed_command(train_args, num_gpus=options.num_gpus, include=options.include,
                                            exclude=options.exclude, master_port=options.master_port))
    if options.include or options.exclude:
        active = filter_resources(pool.hosts, options.include, options.exclude)
        num_nodes = num_gpus = None
    else:
        active = first_hosts(pool, options.num_nodes)
        num_nodes, num_gpus = len(active), gpus_for_every_host(active, options.num_gpus)
    # One host left: the runner starts its ranks locally, without ssh, but would still refuse to start
    # when ssh to that host fails (a one-node SLURM job on nodes without sshd), so skip its ssh check.
    command = deepspeed_command(train_args, hostfile=str(pool.hostfile), num_nodes=num_nodes, num_gpus=num_gpus,
                                include=options.include, exclude=options.exclude,
                                master_addr=options.master_addr or next(iter(active)),
                                master_port=options.master_port, ssh_check=len(active) > 1)
    plan = LaunchPlan(command)
    if pool.generated:
        plan.files.append((pool.hostfile, format_hostfile(pool.hosts)))
    env_file = deepspeed_env_file(environ, variables)
    if env_file is not None:
        plan.files.append(env_file)
    return plan


def deepspeed_env_file(environ: Mapping[str, str], variables: dict[str, str]) -> tuple[Path, str] | None:
    """The merged ``.deepspeed_env`` to write, or None when there is nothing new to forward."""
    if not variables:
        return None
    path = deepspeed_env_path(environ)
    existing = path.read_text() if path.is_file() else ""
    return path, merge_deepspeed_env(existing, variables, str(path))


def torchrun_plan(options: argparse.Namespace, train_args: list[str], pool: HostPool | None,
                  environ: Mapping[str, str]) -> LaunchPlan:
    forwarded_variables(environ, options.env)  # only to reject unknown --env names: torchrun inherits the env
    if pool is None:
        # "gpu" lets torchrun count the local GPUs, as deepspeed does when --num_gpus is left out.
        return LaunchPlan(torchrun_command(train_args, num_nodes=1, nproc_per_node=options.num_gpus or "gpu",
                                           master_addr="localhost", master_port=options.master_port))
    active = first_hosts(pool, options.num_nodes)
    nproc = gpus_for_every_host(active, options.num_gpus)
    if nproc is None:
        raise LaunchError(f"hosts have different slot counts {dict(active)}; torchrun needs one --num-gpus")
    command = torchrun_command(train_args, num_nodes=len(active), nproc_per_node=nproc,
                               master_addr=options.master_addr or next(iter(active)),
                               master_port=options.master_port)
    if options.slurm:
        return LaunchPlan(srun_per_node_prefix(list(active)) + command)
    return LaunchPlan(command, notes=[f"torchrun starts processes on this node only: run the same command on each "
                                      f"of {', '.join(active)}"])


def build_plan(options: argparse.Namespace, train_args: list[str], environ: Mapping[str, str]) -> LaunchPlan:
    pool = resolve_hosts(options, environ)
    check_options(options, train_args, pool)
    build = torchrun_plan if options.launcher == "torchrun" else deepspeed_plan
    return build(options, train_args, pool, environ)


def print_dry_run(plan: LaunchPlan) -> None:
    """Shell-readable: file contents as comments, then the exact command."""
    for path, content in plan.files:
        print(f"# would write {path}:")
        for line in content.splitlines():
            print(f"#   {line}")
    print(shlex.join(plan.command))


def resolve_executable(command: list[str]) -> list[str]:
    """Prefer PATH; fall back to this interpreter's bin/ so an un-activated venv's clip-launch still works."""
    if shutil.which(command[0]) is None:
        beside = Path(sys.executable).parent / command[0]
        if beside.is_file():
            return [str(beside), *command[1:]]
    return command


def execute(plan: LaunchPlan) -> int:
    for path, content in plan.files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"{PROG}: wrote {path}", file=sys.stderr)
    print(f"{PROG}: running: {shlex.join(plan.command)}", file=sys.stderr, flush=True)
    try:
        code = subprocess.call(resolve_executable(plan.command))
    except FileNotFoundError:
        print(f"{PROG}: error: {plan.command[0]}: command not found (is it installed in this environment?)",
              file=sys.stderr)
        return 127
    # A child killed by a signal reports -N; shells report that as 128+N.
    return 128 - code if code < 0 else code


def print_sbatch_template(argv: Sequence[str]) -> int:
    options = sbatch_parser().parse_args(list(argv))
    if not re.fullmatch(r"[\w.-]+", options.job_name):
        raise LaunchError(f"--job-name {options.job_name!r}: use letters, digits, '.', '_' or '-'")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", options.time):
        raise LaunchError(f"--time {options.time!r}: expected [D-]HH:MM:SS")
    print(render_sbatch_script(nodes=options.nodes, gpus_per_node=options.gpus_per_node,
                               cpus_per_task=options.cpus_per_task, time=options.time,
                               config=options.config, job_name=options.job_name), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["sbatch-template"]:
            return print_sbatch_template(argv[1:])
        launcher_args, train_args = split_train_args(argv)
        options = launch_parser().parse_args(launcher_args)
        plan = build_plan(options, train_args, os.environ)
    except LaunchError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    for note in plan.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if options.dry_run:
        print_dry_run(plan)
        return 0
    return execute(plan)


if __name__ == "__main__":
    sys.exit(main())
