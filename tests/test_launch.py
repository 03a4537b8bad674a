"""clip-launch: hostfiles, SLURM node lists, the launcher commands it builds, and its error lines.

Nothing here starts a launcher: commands are checked as argv lists, and the deepspeed runner's own
parser and hostfile/filter functions are called to prove it would accept what we build.
"""
from __future__ import annotations

import os
import re
import shlex

import pytest

from launch.cli import main
from launch.command import deepspeed_command, forwarded_variables, merge_deepspeed_env, torchrun_command
from launch.hostfile import LaunchError, filter_resources, format_hostfile, parse_hostfile_text, read_hostfile
from launch.slurm import expand_nodelist, hosts_from_slurm, parse_gpus_per_node, render_sbatch_script

TRAIN = ["--config", "configs/demo.yaml", "optim.lr=1e-3"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No inherited NCCL/SLURM/PYTHONPATH/DS_ENV_FILE, and a scratch working directory for .deepspeed_env."""
    for name in list(os.environ):
        if name.startswith(("NCCL_", "SLURM_")) or name in ("PYTHONPATH", "DS_ENV_FILE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def hostfile(clean_env):
    path = clean_env / "hosts"
    path.write_text("# cluster\nworker-0 slots=4\n\n  worker-1 slots=4   # second rack\nworker-2 slots=4\n")
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- hostfile -------------------------------------------------------------------------------------------------

def test_hostfile_keeps_order_and_skips_comments(hostfile):
    hosts = read_hostfile(hostfile)
    assert list(hosts.items()) == [("worker-0", 4), ("worker-1", 4), ("worker-2", 4)]
    assert parse_hostfile_text(format_hostfile(hosts)) == hosts


@pytest.mark.parametrize("text, message", [
    ("a slots=2\nb slots\n", "line 2: expected 'HOST slots=N'"),
    ("a slots=2\n\n# c\nb slots=two\n", "line 4: expected 'HOST slots=N'"),
    ("a slots=2 extra=1\n", "line 1: expected 'HOST slots=N'"),
    ("a slots=2\na slots=4\n", "line 2: host a is listed twice"),
    ("a slots=0\n", "line 1: slots must be a positive integer, got 0"),
    ("a slots=-3\n", "line 1: slots must be a positive integer, got -3"),
    ("# only a comment\n\n", "no hosts"),
])
def test_hostfile_errors_name_the_line(text, message):
    with pytest.raises(LaunchError, match=message):
        parse_hostfile_text(text, source="hosts")


def test_deepspeed_reads_our_hostfile_the_same_way():
    from deepspeed.launcher.runner import _parse_hostfile
    text = "# c\nworker-0 slots=8\nworker-1 slots=2 # note\n"
    assert dict(_parse_hostfile(text.splitlines(keepends=True))) == dict(parse_hostfile_text(text))


# --- include / exclude --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("include, exclude", [
    ("worker-0:0,1@worker-2", ""), ("worker-1", ""), ("worker-0@worker-0:3", ""),
    ("", "worker-1"), ("", "worker-0:0,3@worker-2"),
])
def test_resource_filter_matches_deepspeed(include, exclude):
    from deepspeed.launcher.runner import parse_inclusion_exclusion
    hosts = {"worker-0": 4, "worker-1": 4, "worker-2": 4}
    expected = parse_inclusion_exclusion(hosts, include, exclude)
    assert dict(filter_resources(hosts, include, exclude)) == dict(expected)


@pytest.mark.parametrize("include, exclude, message", [
    ("worker-9", "", "--include: unknown host 'worker-9' \\(hosts: worker-0, worker-1\\)"),
    ("worker-0:4", "", "--include: host worker-0 has slots 0-3, got 4"),
    ("worker-0:x", "", "slots of worker-0 must be integers"),
    ("worker-0@@worker-1", "", "expected HOST\\[:SLOT,SLOT...\\]"),
    ("", "nope:0", "--exclude: unknown host 'nope'"),
    ("", "worker-0@worker-1", "leave no GPUs"),
])
def test_resource_filter_errors(include, exclude, message):
    with pytest.raises(LaunchError, match=message):
        filter_resources({"worker-0": 4, "worker-1": 4}, include, exclude)


# --- SLURM ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu-[01-03,07],cpu5,node[1-2]-ib",
     ["gpu-01", "gpu-02", "gpu-03", "gpu-07", "cpu5", "node1-ib", "node2-ib"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a[1,3]b[7]", ["a1b7", "a3b7"]),
    (" x[0-1] ", ["x0", "x1"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("gpu[1-2", "unclosed"), ("gpu1-2]", "without"), ("g[[1]]", "nested"), ("g[3-1]", "backwards"),
    ("g[a-b]", "bad range"), ("g[]", "bad range"), ("a,,b", "empty host"), ("a[1-2],a1", "more than once"),
    ("", "empty"),
])
def test_expand_nodelist_errors(nodelist, message):
    with pytest.raises(LaunchError, match=message):
        expand_nodelist(nodelist)


@pytest.mark.parametrize("value, count", [("4", 4), ("gpu:4", 4), ("a100:8", 8), ("gpu:a100:2", 2)])
def test_gpus_per_node(value, count):
    assert parse_gpus_per_node(value) == count


@pytest.mark.parametrize("value", ["", "gpu", "gpu:0", "a100:2,v100:2", "4(x2)"])
def test_gpus_per_node_errors(value):
    with pytest.raises(LaunchError, match="pass --num-gpus"):
        parse_gpus_per_node(value)


def test_slurm_hosts_prefer_gpus_on_node_and_num_gpus_wins():
    env = {"SLURM_JOB_NODELIST": "g[1-2]", "SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "a100:8"}
    assert dict(hosts_from_slurm(env, None)) == {"g1": 4, "g2": 4}
    assert dict(hosts_from_slurm(env, 2)) == {"g1": 2, "g2": 2}
    assert dict(hosts_from_slurm({"SLURM_JOB_NODELIST": "g1", "SLURM_GPUS_PER_NODE": "a100:8"}, None)) == {"g1": 8}
    with pytest.raises(LaunchError, match="pass --num-gpus"):
        hosts_from_slurm({"SLURM_JOB_NODELIST": "g1"}, None)


# --- commands -------------------------------------------------------------------------------------------------

def test_deepspeed_single_node_command(clean_env, capsys):
    code, out, _ = run_cli(capsys, "--num-gpus", "2", "--dry-run", "--", *TRAIN)
    assert code == 0
    assert shlex.split(out) == ["deepspeed", "--num_gpus", "2", "--master_port", "29500", "--no_local_rank",
                                "--module", "clip_train.cli", *TRAIN]


def test_deepspeed_hostfile_command(hostfile, capsys):
    code, out, _ = run_cli(capsys, "--hostfile", str(hostfile), "--num-nodes", "2", "--master-port", "1234",
                           "--dry-run", "--", *TRAIN)
    assert code == 0
    assert shlex.split(out) == ["deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "4",
                                "--master_addr", "worker-0", "--master_port", "1234", "--no_local_rank",
                                "--module", "clip_train.cli", *TRAIN]


def test_deepspeed_include_command_skips_num_flags_and_uses_first_included_host(hostfile, capsys):
    code, out, _ = run_cli(capsys, "--hostfile", str(hostfile), "--include", "worker-1:0,1@worker-2",
                           "--dry-run", "--", *TRAIN)
    assert code == 0
    assert shlex.split(out) == ["deepspeed", "--hostfile", str(hostfile), "--include", "worker-1:0,1@worker-2",
                                "--master_addr", "worker-1", "--master_port", "29500", "--no_local_rank",
                                "--module", "clip_train.cli", *TRAIN]


def test_one_host_skips_the_runners_ssh_check(hostfile, clean_env, monkeypatch, capsys):
    """With one host the runner launches locally, but it would still stop when ``ssh HOST hostname`` fails
    (a one-node SLURM job on nodes without sshd): one host gets --no_ssh_check, several keep the check."""
    from deepspeed.launcher.runner import parse_args

    for argv in (["--num-nodes", "1"], ["--include", "worker-1:0,1"]):
        code, out, _ = run_cli(capsys, "--hostfile", str(hostfile), *argv, "--dry-run", "--", *TRAIN)
        assert code == 0 and "--no_ssh_check" in shlex.split(out), out
        assert parse_args(shlex.split(out)[1:]).no_ssh_check
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node7")
    code, out, _ = run_cli(capsys, "--slurm", "--num-gpus", "1", "--dry-run", "--", *TRAIN)
    assert shlex.split(out.splitlines()[-1]) == [
        "deepspeed", "--hostfile", str(clean_env / "tmp" / f"clip-launch-{os.getpid()}.hostfile"), "--num_nodes", "1",
        "--num_gpus", "1", "--master_addr", "node7", "--no_ssh_check", "--master_port", "29500", "--no_local_rank",
        "--module", "clip_train.cli", *TRAIN]
    for argv in (["--num-nodes", "2"], ["--include", "worker-0@worker-2"], []):
        code, out, _ = run_cli(capsys, "--hostfile", str(hostfile), *argv, "--dry-run", "--", *TRAIN)
        assert code == 0 and "--no_ssh_check" not in out, out


def test_slurm_dry_run_shows_hostfile_and_command(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-[01-02]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    code, out, _ = run_cli(capsys, "--slurm", "--dry-run", "--", *TRAIN)
    assert code == 0
    hostfile = clean_env / "tmp" / "clip-launch-77.hostfile"
    lines = out.splitlines()
    assert lines[:3] == [f"# would write {hostfile}:", "#   gpu-01 slots=8", "#   gpu-02 slots=8"]
    assert shlex.split(lines[-1]) == ["deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2",
                                      "--num_gpus", "8", "--master_addr", "gpu-01", "--master_port", "29500",
                                      "--no_local_rank", "--module", "clip_train.cli", *TRAIN]
    assert not hostfile.exists(), "a dry run writes nothing"


def test_slurm_run_writes_hostfile_and_env_then_calls_launcher(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-3]")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "gpu:2")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    calls = []
    monkeypatch.setattr("launch.cli.subprocess.call", lambda argv: calls.append(argv) or 3)
    out_file = clean_env / "job" / "hosts"
    code, _, err = run_cli(capsys, "--slurm", "--hostfile-out", str(out_file), "--num-nodes", "2", "--", *TRAIN)
    assert code == 3, "the launcher's exit code is ours"
    assert out_file.read_text() == "n1 slots=2\nn2 slots=2\nn3 slots=2\n"
    assert (clean_env / ".deepspeed_env").read_text() == "NCCL_DEBUG=INFO\n"
    assert calls[0][-len(TRAIN) - 2:] == ["--module", "clip_train.cli", *TRAIN]
    assert "--num_nodes" in calls[0] and calls[0][calls[0].index("--num_nodes") + 1] == "2"
    assert "running: deepspeed" in err


def test_torchrun_commands(hostfile, monkeypatch, capsys):
    code, out, err = run_cli(capsys, "--hostfile", str(hostfile), "--launcher", "torchrun", "--dry-run", "--", *TRAIN)
    assert code == 0
    assert shlex.split(out) == ["torchrun", "--nnodes", "3", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
                                "--rdzv_endpoint", "worker-0:29500", "-m", "clip_train.cli", *TRAIN]
    assert "run the same command on each of worker-0, worker-1, worker-2" in err

    code, out, _ = run_cli(capsys, "--launcher", "torchrun", "--dry-run", "--", *TRAIN)
    assert shlex.split(out)[:9] == ["torchrun", "--nnodes", "1", "--nproc_per_node", "gpu", "--rdzv_backend",
                                    "c10d", "--rdzv_endpoint", "localhost:29500"]

    monkeypatch.setenv("SLURM_JOB_NODELIST", "g[1-3]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    code, out, _ = run_cli(capsys, "--slurm", "--num-nodes", "2", "--launcher", "torchrun", "--dry-run", "--", *TRAIN)
    assert shlex.split(out) == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--nodelist", "g1,g2",
                                "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc_per_node", "4",
                                "--rdzv_backend", "c10d", "--rdzv_endpoint", "g1:29500", "-m", "clip_train.cli",
                                *TRAIN]


def test_launchers_own_parsers_accept_our_commands():
    from deepspeed.launcher.runner import parse_args
    from torch.distributed.run import get_args_parser
    ds = deepspeed_command(TRAIN, hostfile="/h", num_nodes=2, num_gpus=4, master_addr="w0", master_port=1234)
    args = parse_args(ds[1:])
    assert (args.hostfile, args.num_nodes, args.num_gpus, args.master_addr, args.master_port) == ("/h", 2, 4, "w0", 1234)
    assert args.module and args.no_local_rank and args.launcher == "pdsh"
    assert (args.user_script, args.user_args) == ("clip_train.cli", TRAIN)
    args = parse_args(deepspeed_command(TRAIN, hostfile="/h", include="w0:0,1@w1", master_addr="w0")[1:])
    assert (args.include, args.num_nodes, args.num_gpus) == ("w0:0,1@w1", -1, -1)

    tr = torchrun_command(TRAIN, num_nodes=2, nproc_per_node=4, master_addr="w0", master_port=1234)
    targs = get_args_parser().parse_args(tr[1:])
    assert (targs.nnodes, targs.nproc_per_node, targs.rdzv_endpoint, targs.module) == ("2", "4", "w0:1234", True)
    assert (targs.training_script, targs.training_script_args) == ("clip_train.cli", TRAIN)


# --- environment forwarding ---------------------------------------------------------------------------------------

def test_forwarded_variables(clean_env, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("PYTHONPATH", "/src")
    monkeypatch.setenv("DATA_ROOT", "/shared/shards")
    assert forwarded_variables(os.environ, ["DATA_ROOT"]) == {
        "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "ib0", "PYTHONPATH": "/src", "DATA_ROOT": "/shared/shards"}
    with pytest.raises(LaunchError, match="--env MISSING: not set"):
        forwarded_variables(os.environ, ["MISSING"])
    monkeypatch.setenv("BAD", "a\nb")
    with pytest.raises(LaunchError, match="BAD: its value contains a newline"):
        forwarded_variables(os.environ, ["BAD"])


def test_deepspeed_env_merge_keeps_user_entries():
    assert merge_deepspeed_env("A=1\nNCCL_DEBUG=WARN\n", {"NCCL_DEBUG": "INFO", "B": "x y"}, "f") == \
        "A=1\nNCCL_DEBUG=INFO\nB=x y\n"
    with pytest.raises(LaunchError, match="f line 2: expected KEY=VALUE"):
        merge_deepspeed_env("A=1\n\n", {"B": "2"}, "f")


def test_dry_run_prints_deepspeed_env_without_writing(hostfile, monkeypatch, capsys):
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("NCCL_IB_DISABLE", "1")
    monkeypatch.setenv("SHARDS", "pipe:curl -s http://x/{0..9}.tar")
    code, out, _ = run_cli(capsys, "--hostfile", str(hostfile), "--env", "SHARDS", "--dry-run", "--", *TRAIN)
    assert code == 0
    assert out.splitlines()[:4] == ["# would write .deepspeed_env:", "#   NCCL_DEBUG=INFO", "#   NCCL_IB_DISABLE=1",
                                    "#   SHARDS=pipe:curl -s http://x/{0..9}.tar"]
    assert not (hostfile.parent / ".deepspeed_env").exists()


def test_deepspeed_env_file_name_follows_ds_env_file(hostfile, monkeypatch, capsys):
    monkeypatch.setenv("DS_ENV_FILE", "custom_env")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    _, out, _ = run_cli(capsys, "--hostfile", str(hostfile), "--dry-run", "--", *TRAIN)
    assert out.startswith("# would write custom_env:")


# --- sbatch template ------------------------------------------------------------------------------------------

def test_sbatch_template(capsys):
    code, out, _ = run_cli(capsys, "sbatch-template", "--nodes", "4", "--gpus-per-node", "8",
                           "--config", "configs/my run.yaml")
    assert code == 0
    assert "#SBATCH --nodes=4\n" in out and "#SBATCH --gpus-per-node=8\n" in out
    assert "#SBATCH --ntasks-per-node=1\n" in out
    assert "--config 'configs/my run.yaml'" in out
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in out
    assert "clip-launch --slurm" in out and "# srun" in out
    assert "@" not in out.replace('"$', ""), "every placeholder is filled"
    assert render_sbatch_script(nodes=1, gpus_per_node=1, cpus_per_task=1, time="1:00:00", config="c",
                                job_name="j").startswith("#!/bin/bash")


def test_sbatch_template_for_cpu_nodes(capsys):
    """--gpus-per-node 0: no GPU request (a cluster without GPU gres rejects the job otherwise) and
    --num-gpus 1 for clip-launch, which has no GPU count to read from the job: one process per node."""
    code, out, _ = run_cli(capsys, "sbatch-template", "--nodes", "3", "--gpus-per-node", "0", "--config", "c.yaml")
    assert code == 0
    assert "--gpus-per-node" not in out and "--gres" not in out and "cuda" not in out
    commands = [line for line in out.splitlines() if "clip-launch --slurm" in line]
    assert len(commands) == 2 and all("clip-launch --slurm --num-gpus 1 " in line for line in commands)
    assert "#SBATCH --nodes=3\n" in out and "#SBATCH --ntasks-per-node=1\n" in out
    assert "# srun --kill-on-bad-exit=1 python -m clip_train.cli --config c.yaml\n" in out
    assert "@" not in out.replace('"$', "")
    gpu = render_sbatch_script(nodes=3, gpus_per_node=4, cpus_per_task=8, time="1:00:00", config="c.yaml", job_name="j")
    assert "#SBATCH --gpus-per-node=4\n" in gpu and "--num-gpus" not in gpu and "--ntasks-per-node=4 " in gpu
    code, _, err = run_cli(capsys, "sbatch-template", "--gpus-per-node", "-1")
    assert code == 2 and "must be a non-negative integer" in err


# --- bad invocations --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--hostfile", "missing", "--", "x"], "hostfile not found: missing"),
    (["--hostfile", "HOSTS", "--slurm", "--", "x"], "not allowed with argument"),
    (["--slurm", "--", "x"], "SLURM_JOB_NODELIST is not set"),
    (["--hostfile", "HOSTS"], "no clip-train arguments: put them after '--'"),
    (["--hostfile", "HOSTS", "--"], "no clip-train arguments"),
    (["--hostfile", "HOSTS", "--num-nodes", "5", "--", "x"], "--num-nodes 5 but .* has only 3 host"),
    (["--hostfile", "HOSTS", "--num-gpus", "8", "--", "x"], "--num-gpus 8 but host worker-0 has only 4"),
    (["--hostfile", "HOSTS", "--include", "worker-9", "--", "x"], "--include: unknown host 'worker-9'"),
    (["--hostfile", "HOSTS", "--include", "worker-0", "--exclude", "worker-1", "--", "x"], "cannot be used together"),
    (["--hostfile", "HOSTS", "--include", "worker-0", "--num-gpus", "2", "--", "x"], "cannot be combined"),
    (["--hostfile", "HOSTS", "--launcher", "torchrun", "--exclude", "worker-0", "--", "x"], "deepspeed launcher options"),
    (["--num-nodes", "2", "--", "x"], "needs --hostfile or --slurm"),
    (["--master-addr", "h", "--", "x"], "only applies to multi-node"),
    (["--include", "other:0", "--", "x"], "only host is localhost"),
    (["--hostfile-out", "f", "--", "x"], "only applies with --slurm"),
    (["--master-port", "70000", "--", "x"], "port number"),
    (["--launcher", "mpi", "--", "x"], "invalid choice"),
    (["--env", "NOT_SET_ANYWHERE", "--", "x"], "--env NOT_SET_ANYWHERE: not set"),
    (["--bogus", "--", "x"], "unrecognized arguments: --bogus"),
    (["sbatch-template", "--time", "forever"], "--time 'forever'"),
])
def test_bad_invocations_exit_2_with_one_line(hostfile, capsys, argv, message):
    argv = [str(hostfile) if arg == "HOSTS" else arg for arg in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("clip-launch: error: ")
    assert re.search(message, err), err


def test_missing_launcher_executable_is_one_line(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(clean_env))
    monkeypatch.setattr("launch.cli.sys.executable", str(clean_env / "python"))
    code, _, err = run_cli(capsys, "--launcher", "torchrun", "--", *TRAIN)
    assert code == 127 and err.splitlines()[-1].startswith("clip-launch: error: torchrun: command not found")
