"""DeepSpeed-format hostfiles (``host slots=N``) and the ``--include/--exclude`` resource specs.

We parse more strictly than the deepspeed runner (which only matches ``^\\S+\\s+slots=\\d+``) so a
typo fails here with a line number instead of in the middle of a pdsh launch, but everything we
accept is also accepted by the runner, which re-reads the same file.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path


class LaunchError(ValueError):
    """A launch request that cannot work; the message is one line that says what to change.

    Defined here, the dependency-free base module, rather than in ``__init__`` so that submodules
    import it even when an editable install made before ``__init__.py`` existed maps ``launch`` as a
    namespace package (whose ``__init__`` never runs).
    """


_HOST_LINE = re.compile(r"^(?P<host>[^\s#=]+)\s+slots=(?P<slots>-?\d+)\s*(#.*)?$")


def parse_hostfile_text(text: str, source: str = "hostfile") -> "OrderedDict[str, int]":
    """Ordered host -> slots; host order is rank order, so the first host is the master."""
    hosts: OrderedDict[str, int] = OrderedDict()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise LaunchError(f"{source} line {number}: expected 'HOST slots=N', got {line!r}")
        host, slots = match["host"], int(match["slots"])
        if slots <= 0:
            raise LaunchError(f"{source} line {number}: slots must be a positive integer, got {slots} for {host}")
        if host in hosts:
            raise LaunchError(f"{source} line {number}: host {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise LaunchError(f"{source}: no hosts (expected lines like 'worker-0 slots=8')")
    return hosts


def read_hostfile(path: str | Path) -> "OrderedDict[str, int]":
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile not found: {path}")
    return parse_hostfile_text(path.read_text(), source=str(path))


def format_hostfile(hosts: dict[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def parse_resource_spec(spec: str, flag: str) -> "OrderedDict[str, list[int] | None]":
    """``host1:0,1@host2`` -> {host1: [0, 1], host2: None}; None means every slot of that host."""
    nodes: OrderedDict[str, list[int] | None] = OrderedDict()
    for node_spec in spec.split("@"):
        host, sep, slot_text = node_spec.partition(":")
        if not host or (sep and not slot_text) or ":" in slot_text:
            raise LaunchError(f"{flag} {spec!r}: expected HOST[:SLOT,SLOT...] joined by '@', got {node_spec!r}")
        slots: list[int] = []
        if sep:
            try:
                slots = [int(slot) for slot in slot_text.split(",")]
            except ValueError:
                raise LaunchError(f"{flag} {spec!r}: slots of {host} must be integers, got {slot_text!r}") from None
        # A host named twice merges its explicit slots; like deepspeed, a bare mention only means
        # "all slots" when no slot of that host is named anywhere in the spec.
        nodes[host] = sorted({*(nodes.get(host) or []), *slots}) or None
    return nodes


def check_resource_spec(spec: str, flag: str, hosts: dict[str, int]) -> "OrderedDict[str, list[int] | None]":
    """Parse and check every host and slot against the hostfile, so a typo is caught before any ssh."""
    nodes = parse_resource_spec(spec, flag)
    for host, slots in nodes.items():
        if host not in hosts:
            raise LaunchError(f"{flag}: unknown host {host!r} (hosts: {', '.join(hosts)})")
        bad = [slot for slot in slots or [] if not 0 <= slot < hosts[host]]
        if bad:
            raise LaunchError(f"{flag}: host {host} has slots 0-{hosts[host] - 1}, got {bad[0]}")
    return nodes


def filter_resources(hosts: dict[str, int], include: str = "", exclude: str = "") -> "OrderedDict[str, list[int]]":
    """The host -> slot ids that remain after ``--include`` or ``--exclude``, in hostfile order."""
    if include and exclude:
        raise LaunchError("--include and --exclude cannot be used together")
    active = OrderedDict((host, list(range(slots))) for host, slots in hosts.items())
    if include:
        chosen = check_resource_spec(include, "--include", hosts)
        active = OrderedDict((host, slots if chosen[host] is None else chosen[host])
                             for host, slots in active.items() if host in chosen)
    elif exclude:
        dropped = check_resource_spec(exclude, "--exclude", hosts)
        for host, slots in dropped.items():
            active[host] = [] if slots is None else [slot for slot in active[host] if slot not in slots]
    active = OrderedDict((host, slots) for host, slots in active.items() if slots)
    if not active:
        raise LaunchError(f"--include/--exclude leave no GPUs to run on (hosts: {', '.join(hosts)})")
    return active
