"""Read a SLURM allocation: expand ``SLURM_JOB_NODELIST`` and count GPUs per node."""
from __future__ import annotations

import collections
import itertools
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Mapping

from .hostfile import LaunchError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"node list {text!r}: nested '[' at position {index}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"node list {text!r}: ']' without '[' at position {index}")
        elif char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    if depth:
        raise LaunchError(f"node list {text!r}: unclosed '['")
    items.append(text[start:])
    return items


def _expand_group(group: str, nodelist: str) -> list[str]:
    """``01-03,07`` -> ``['01', '02', '03', '07']``; the width of the first number keeps zero padding."""
    values = []
    for part in group.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise LaunchError(f"node list {nodelist!r}: bad range {part!r} in [{group}]")
        first, last = match[1], match[2] if match[2] is not None else match[1]
        if int(last) < int(first):
            raise LaunchError(f"node list {nodelist!r}: range {part!r} goes backwards")
        values.extend(str(number).zfill(len(first)) for number in range(int(first), int(last) + 1))
    return values


def _expand_item(item: str, nodelist: str) -> list[str]:
    """One host pattern, possibly with several bracket groups: ``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2."""
    if not item:
        raise LaunchError(f"node list {nodelist!r}: empty host name")
    # re.split with a capture group alternates literal text and bracket contents.
    pieces = re.split(r"\[([^\[\]]*)\]", item)
    choices = [[piece] if position % 2 == 0 else _expand_group(piece, nodelist)
               for position, piece in enumerate(pieces)]
    return ["".join(parts) for parts in itertools.product(*choices)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, e.g. ``gpu-[01-03,07],cpu5`` -> gpu-01 gpu-02 gpu-03 gpu-07 cpu5."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise LaunchError("node list is empty")
    hosts = [host for item in _split_top_level(nodelist) for host in _expand_item(item, nodelist)]
    duplicates = sorted(host for host, seen in collections.Counter(hosts).items() if seen > 1)
    if duplicates:
        raise LaunchError(f"node list {nodelist!r}: host {duplicates[0]} appears more than once")
    return hosts


def parse_gpus_per_node(value: str) -> int:
    """``4``, ``gpu:4``, ``a100:8`` or ``gpu:a100:8`` -> the count, the last ``:`` field."""
    count = value.strip().rsplit(":", 1)[-1]
    if "," in value or not count.isdigit() or int(count) <= 0:
        raise LaunchError(f"cannot read a GPU count from {value!r} (expected e.g. 4, gpu:4 or a100:8); pass --num-gpus")
    return int(count)


def gpus_per_node(environ: Mapping[str, str], num_gpus: int | None) -> int:
    """An explicit ``--num-gpus`` wins; otherwise what SLURM says this job has on each node."""
    if num_gpus is not None:
        return num_gpus
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if environ.get(name):
            return parse_gpus_per_node(environ[name])
    raise LaunchError("--slurm: neither SLURM_GPUS_ON_NODE nor SLURM_GPUS_PER_NODE is set; pass --num-gpus")


def hosts_from_slurm(environ: Mapping[str, str], num_gpus: int | None) -> "collections.OrderedDict[str, int]":
    """The allocation as a hostfile dict; every node gets the same slot count, as SLURM allocates."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("--slurm: SLURM_JOB_NODELIST is not set (run inside an sbatch/salloc allocation)")
    slots = gpus_per_node(environ, num_gpus)
    return collections.OrderedDict((host, slots) for host in expand_nodelist(nodelist))


def default_hostfile_path(environ: Mapping[str, str]) -> Path:
    """A per-job file in the node-local temp dir: only the launching node reads it."""
    job = environ.get("SLURM_JOB_ID") or str(os.getpid())
    base = environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(base) / f"clip-launch-{job}.hostfile"


_SRUN_NOTE_GPU = """\
# (c) No launcher at all: one srun task per GPU, ranks from SLURM_PROCID/SLURM_LOCALID. Change the header
#     to --ntasks-per-node={gpus} (and --cpus-per-task to the CPUs per GPU) first. Every task sees
#     all GPUs of its node and takes cuda:SLURM_LOCALID, so do not bind with --gpus-per-task."""

_SRUN_NOTE_CPU = """\
# (c) No launcher at all: one srun task per rank, ranks from SLURM_PROCID/SLURM_LOCALID. Change the header
#     to --ntasks-per-node=RANKS (the ranks per node) and --cpus-per-task to the CPUs per rank first."""


def render_sbatch_script(*, nodes: int, gpus_per_node: int, cpus_per_task: int, time: str, config: str,
                         job_name: str) -> str:
    """The batch script template with its ``@NAME@`` slots filled (``@`` never clashes with shell ``$``).

    ``gpus_per_node=0`` is the CPU form: no GPU request (a ``--gpus-per-node`` line is refused by a
    cluster without GPU gres), and ``--num-gpus 1`` for clip-launch, which otherwise reads its
    processes per node from the job's GPU count: one clip-train process per node.
    """
    text = (Path(__file__).parent / "sbatch_template.txt").read_text()
    if gpus_per_node:
        gpu_request, num_gpus = f"#SBATCH --gpus-per-node={gpus_per_node}", ""
        srun_note = _SRUN_NOTE_GPU.format(gpus=gpus_per_node)
    else:
        gpu_request, num_gpus = "# CPU nodes: no GPU request; clip-launch runs one clip-train process per node.", \
            " --num-gpus 1"
        srun_note = _SRUN_NOTE_CPU
    values = {"NODES": nodes, "GPU_REQUEST": gpu_request, "NUM_GPUS": num_gpus, "SRUN_NOTE": srun_note,
              "CPUS_PER_TASK": cpus_per_task, "TIME": time, "CONFIG": shlex.quote(config), "JOB_NAME": job_name}
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    return text
