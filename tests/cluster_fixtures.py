"""Real clusters on this one machine for tests/test_launch_cluster.py (imported as ``cluster_fixtures``).

* ``ssh_nodes``: an sshd listening only on 127.0.0.2 and 127.0.0.3 (the "nodes" ``clipnode1`` and
  ``clipnode2``, named in /etc/hosts by tests/install_system_packages.sh) on a free port, with a
  throw-away host key and client key, and an ``ssh`` on PATH that reads our client config (it stands
  in for ``~/.ssh/config``: the DeepSpeed runner's ssh check and pdsh both run plain ``ssh HOST``).
* ``slurm_cluster``: munged, slurmctld and slurmd for a one-node SLURM (node ``localhost``, 2 CPUs,
  no accounting, no cgroups), all with their own config, key, sockets, state and logs in a temp dir.

Every daemon is a child process of the test run, started in the foreground (``-D``/``-F``) and
stopped at teardown, also on failure; processes started through them (ranks over ssh, job steps) are
found by a marker in their environment and stopped too. Nothing is installed or enabled system-wide.
"""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

VENV_BIN = Path(sys.executable).parent
SBIN = ("/usr/sbin", "/sbin")
NODES = {"clipnode1": "127.0.0.2", "clipnode2": "127.0.0.3"}
INSTALL_HINT = "run `bash tests/install_system_packages.sh` (as root)"
# Variables of an enclosing launch that must not leak into the runs a test starts.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "DS_ENV_FILE", "DEEPSPEED_ENV_PATH", "SLURM_CONF")


def which(program: str) -> str | None:
    return shutil.which(program) or next((f"{d}/{program}" for d in SBIN if os.access(f"{d}/{program}", os.X_OK)),
                                         None)


def missing_programs(*programs: str) -> list[str]:
    return [p for p in programs if which(p) is None]


def clean_environ(**extra: str) -> dict[str, str]:
    """This environment without launcher/SLURM variables, the venv's bin first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def free_port(*hosts: str) -> int:
    """A TCP port free on every one of ``hosts`` (default 127.0.0.1)."""
    hosts = hosts or ("127.0.0.1",)
    for _ in range(50):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            try:
                others = []
                for host in hosts[1:]:
                    sock = socket.socket()
                    others.append(sock)
                    sock.bind((host, port))
                return port
            except OSError:
                continue
            finally:
                for sock in others:
                    sock.close()
    raise RuntimeError(f"no port free on all of {hosts}")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, details: Callable[[], str] = lambda: "",
             interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{details()}")
        time.sleep(interval)


# --- processes --------------------------------------------------------------------------------------------------

@dataclass
class ProcInfo:
    pid: int
    ppid: int
    argv: list[str]
    environ: dict[str, str]


def read_proc(pid: int) -> ProcInfo | None:
    """argv, parent and environment of a live process (None when it is gone or unreadable)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
    environ = dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)
    return ProcInfo(pid, ppid, [a.decode(errors="replace") for a in argv], environ)


class ProcessSampler:
    """Collects the processes matching ``where`` over repeated ``sample()`` calls while a run goes on.

    ``found()`` leaves out forked children of a match (a fork shows its parent's argv and environment
    until it execs, e.g. a subprocess being started), so it lists each matching program once.
    """

    def __init__(self, where: Callable[[ProcInfo], bool]):
        self.where, self.seen = where, {}

    def sample(self) -> None:
        for info in processes(self.where):
            self.seen.setdefault(info.pid, info)

    def found(self) -> list[ProcInfo]:
        return [info for info in self.seen.values() if info.ppid not in self.seen]


def processes(where: Callable[[ProcInfo], bool]) -> list[ProcInfo]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            info = read_proc(int(entry.name))
            if info is not None and where(info):
                found.append(info)
    return found


def processes_with_env(name: str, value: str) -> list[ProcInfo]:
    return processes(lambda p: p.environ.get(name) == value)


def kill_all(infos: list[ProcInfo]) -> None:
    """SIGTERM, a short grace period, then SIGKILL, for processes this test started (found by marker)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for info in infos:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, sig)
                alive.append(info)
        if not alive:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{i.pid}").exists() and not _zombie(i.pid)
                                                  for i in alive):
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class Daemon:
    """A foreground daemon as a child process, its output in ``log``; ``stop`` is idempotent."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]):
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run_checked(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


# --- data and runs ------------------------------------------------------------------------------------------------

def repack_shards(train_dir: Path, out: Path, shards: int, per_shard: int) -> Path:
    """The first ``shards * per_shard`` samples of a ``clip-prep`` training set, ``per_shard`` per tar.

    With shards of exactly one per-rank batch, no sample shuffle and no augmentation, rank r of W reads
    shards r, r+W, ... of the (seed-fixed) shard order, so every step's global batch is the same W
    shards as a single process with W times the batch reads: the runs differ only in the launch.
    """
    out.mkdir(parents=True)
    source = tarfile.open(sorted(train_dir.glob("*.tar"))[0])
    samples: dict[str, list[tarfile.TarInfo]] = {}
    for member in source.getmembers():
        samples.setdefault(member.name.split(".", 1)[0], []).append(member)
    keys = list(samples)[:shards * per_shard]
    assert len(keys) == shards * per_shard, f"{train_dir} has fewer than {shards * per_shard} samples in one shard"
    sizes = {}
    for index in range(shards):
        name = f"{index:05d}.tar"
        with tarfile.open(out / name, "w") as tar:
            for key in keys[index * per_shard:(index + 1) * per_shard]:
                for member in samples[key]:
                    tar.addfile(member, source.extractfile(member))
        sizes[name] = per_shard
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def read_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


# --- ssh "nodes" ------------------------------------------------------------------------------------------------

def ssh_skip_reason() -> str | None:
    missing = missing_programs("sshd", "ssh", "ssh-keygen", "pdsh")
    if missing:
        return f"{', '.join(missing)} not installed ({INSTALL_HINT})"
    for name, address in NODES.items():
        try:
            resolved = socket.gethostbyname(name)
        except OSError:
            return f"host name {name} does not resolve (expected {address} in /etc/hosts: {INSTALL_HINT})"
        if resolved != address:
            return f"host name {name} resolves to {resolved}, not {address} (/etc/hosts)"
    if os.geteuid() != 0 and not Path("/run/sshd").is_dir():
        return "sshd needs /run/sshd (create it as root, or run the tests as root)"
    return None


@dataclass
class SshNodes:
    hosts: list[str]
    port: int
    path_dir: Path  # put first on PATH: its ``ssh`` reads our client config
    sshd: Daemon


@contextlib.contextmanager
def ssh_nodes(tmp: Path) -> Iterator[SshNodes]:
    keygen, sshd_bin, ssh_bin = which("ssh-keygen"), which("sshd"), which("ssh")
    port = free_port(*NODES.values())
    host_key, client_key = tmp / "host_ed25519", tmp / "client_ed25519"
    for key in (host_key, client_key):
        run_checked([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "clip-launch-test", "-f", str(key)])
    authorized = tmp / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o600)
    user = pwd.getpwuid(os.getuid()).pw_name
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", *(f"ListenAddress {address}" for address in NODES.values()),
        f"HostKey {host_key}", f"PidFile {tmp / 'sshd.pid'}", f"AuthorizedKeysFile {authorized}",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "X11Forwarding no", "PrintMotd no",
        f"AllowUsers {user}", "LogLevel INFO", ""]))
    known_hosts = tmp / "known_hosts"
    host_public = Path(f"{host_key}.pub").read_text().split()
    known_hosts.write_text(",".join(f"[{name}]:{port}" for name in NODES) + f" {host_public[0]} {host_public[1]}\n")
    client_config = tmp / "ssh_config"
    client_config.write_text("\n".join([
        f"Host {' '.join(NODES)}", f"  Port {port}", f"  User {user}", f"  IdentityFile {client_key}",
        "  IdentitiesOnly yes", f"  UserKnownHostsFile {known_hosts}", "  StrictHostKeyChecking yes",
        "  BatchMode yes", "  LogLevel ERROR", ""]))
    path_dir = tmp / "bin"
    path_dir.mkdir()
    wrapper = path_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {ssh_bin} -F {client_config} "$@"\n')
    wrapper.chmod(0o755)

    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    run_checked([sshd_bin, "-t", "-f", str(config)])
    sshd = Daemon("sshd", [sshd_bin, "-D", "-e", "-f", str(config)], tmp / "sshd.log", clean_environ())
    try:
        def reachable() -> bool:
            sshd.check_running()
            return all(subprocess.run([str(wrapper), name, "true"], capture_output=True, timeout=20).returncode == 0
                       for name in NODES)

        wait_for(reachable, 30, "ssh to clipnode1 and clipnode2", sshd.tail)
        yield SshNodes(list(NODES), port, path_dir, sshd)
    finally:
        sshd.stop()


# --- SLURM ------------------------------------------------------------------------------------------------------

SLURM_PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo",
                  "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def slurm_skip_reason() -> str | None:
    missing = missing_programs(*SLURM_PROGRAMS)
    if missing:
        return f"{', '.join(missing)} not installed ({INSTALL_HINT})"
    if os.geteuid() != 0:
        return "slurmd and slurmctld (SlurmUser=root) need root"
    return None


@dataclass
class SlurmCluster:
    conf: Path
    node: str
    env: dict[str, str]  # what commands of this cluster need (SLURM_CONF, PATH with the venv)
    daemons: list[Daemon]

    def logs(self) -> str:
        return "\n".join(f"--- {d.name}:\n{d.tail(2000)}" for d in self.daemons)

    def job_state(self, job_id: str) -> str:
        out = subprocess.run([which("scontrol"), "show", "job", "-o", job_id], capture_output=True, text=True,
                             env=self.env).stdout
        fields = dict(item.partition("=")[::2] for item in out.split())
        return fields.get("JobState", "UNKNOWN")

    def job_field(self, job_id: str, name: str) -> str:
        out = run_checked([which("scontrol"), "show", "job", "-o", job_id], env=self.env).stdout
        return dict(item.partition("=")[::2] for item in out.split()).get(name, "")

    def wait_job(self, job_id: str, timeout: float, on_poll: Callable[[], None] | None = None) -> str:
        """Poll ``scontrol show job`` (no accounting daemon: squeue/sacct would not keep the final state)."""
        states = []

        def done() -> bool:
            for daemon in self.daemons:
                daemon.check_running()
            if on_poll is not None:
                on_poll()
            states.append(self.job_state(job_id))
            return states[-1] in TERMINAL_STATES

        try:
            wait_for(done, timeout, f"job {job_id} to finish", self.logs, interval=0.5)
        except AssertionError:
            subprocess.run([which("scancel"), job_id], env=self.env, capture_output=True)
            raise
        return states[-1]


@contextlib.contextmanager
def slurm_cluster() -> Iterator[SlurmCluster]:
    # A short path under /tmp: unix socket paths (munge's, slurmd's step sockets) are limited to 107 bytes,
    # and munged wants every directory above its socket to be searchable by all.
    root = Path(tempfile.mkdtemp(prefix="clip-slurm-", dir="/tmp"))
    root.chmod(0o755)
    daemons: list[Daemon] = []
    conf = root / "slurm.conf"
    env = clean_environ(SLURM_CONF=str(conf))
    try:
        key_dir, sock_dir = root / "munge-key", root / "munge-run"
        key_dir.mkdir(mode=0o700)
        sock_dir.mkdir(mode=0o755)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(128))  # what `mungekey --create` writes: random bytes, mode 0600
        key.chmod(0o600)
        socket_path = sock_dir / "munge.socket"
        munged = Daemon("munged", [which("munged"), "--foreground", f"--key-file={key}", f"--socket={socket_path}",
                                   f"--pid-file={sock_dir / 'munged.pid'}", f"--log-file={key_dir / 'munged.log'}",
                                   f"--seed-file={key_dir / 'munged.seed'}"], root / "munged.out", env)
        daemons.append(munged)

        def munge_works() -> bool:
            munged.check_running()
            return socket_path.exists() and subprocess.run([which("munge"), "-n", "-S", str(socket_path)],
                                                           capture_output=True).returncode == 0

        wait_for(munge_works, 20, "munged", munged.tail)

        for name in ("state", "spool", "log"):
            (root / name).mkdir()
        node, cpus = "localhost", 2
        ctld_port, slurmd_port = free_port(), free_port()
        conf.write_text("\n".join([
            "ClusterName=cliptest", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/builtin",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "ReturnToService=2",
            # The node has the CPUs this file says, whatever the machine has (no drain on a mismatch).
            "SlurmdParameters=config_overrides", "CommunicationParameters=NoInAddrAny",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""]))
        daemons.append(Daemon("slurmctld", [which("slurmctld"), "-D"], root / "slurmctld.out", env))
        daemons.append(Daemon("slurmd", [which("slurmd"), "-D", "-N", node], root / "slurmd.out", env))
        cluster = SlurmCluster(conf, node, env, daemons)

        def node_idle() -> bool:
            for daemon in daemons:
                daemon.check_running()
            state = subprocess.run([which("sinfo"), "-h", "-n", node, "-o", "%T"], capture_output=True, text=True,
                                   env=env).stdout.strip()
            return state == "idle"

        wait_for(node_idle, 60, f"sinfo to show {node} idle", cluster.logs, interval=0.5)
        yield cluster
    finally:
        if daemons[1:]:
            subprocess.run([which("scancel"), "--full", "--user", str(os.getuid())], env=env, capture_output=True)
        for daemon in reversed(daemons):
            daemon.stop()
        # Job steps and anything they started carry our SLURM_CONF in their environment.
        kill_all(processes_with_env("SLURM_CONF", str(conf)))
        shutil.rmtree(root, ignore_errors=True)
