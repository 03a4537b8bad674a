"""clip-launch for real: DeepSpeed's pdsh/ssh launcher across two "nodes", and SLURM batch jobs.

tests/test_launch.py checks the commands clip-launch builds; here they run, on this one machine:

* **Two nodes over ssh.** An sshd listens only on 127.0.0.2 and 127.0.0.3, named clipnode1 and
  clipnode2 (see ``cluster_fixtures``). ``clip-launch --hostfile`` with one slot per node runs the
  DeepSpeed runner, which starts ``deepspeed.launcher.launch`` on both nodes through pdsh and ssh,
  one clip-train rank each. While it runs, the test reads the ranks' environments in /proc.
* **SLURM.** A one-node SLURM (munged, slurmctld, slurmd; 2 CPUs) runs the script that
  ``clip-launch sbatch-template --gpus-per-node 0`` prints, as printed (its default form:
  ``clip-launch --slurm`` inside the job), and the same script switched to its one-task-per-rank
  ``srun python -m clip_train.cli`` form, with 2 tasks, as the script's comment says to.

Every run trains the same 6 steps on shards of exactly one per-rank batch with no sample shuffle
and no augmentation, so 2 ranks x batch 4 see the same global batches as 1 process x batch 8
(``cluster_fixtures.repack_shards``); the single process is the reference, and every run's losses
must equal its losses (fp32; measured: within 2.1e-7 relative). The 2-rank runs need a correct
rank/world assignment and data split for that: two ranks both reading shards of rank 0, or two
one-process worlds, give other losses.

Needs openssh-server + pdsh, and slurm-wlm + munge (tests/install_system_packages.sh installs them
and the /etc/hosts names); without them the tests skip, naming what is missing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from project_paths import DEMO_CONFIG

import cluster_fixtures as cf

PER_RANK_BATCH, WORLD, STEPS = 4, 2, 6
RUN_TIMEOUT_S = 240
LOSS_RTOL = 1e-5
FORWARDED, NOT_FORWARDED = "CLIP_LAUNCH_TEST_FORWARDED", "CLIP_LAUNCH_TEST_NOT_FORWARDED"
EXPORT_FILES = ("open_clip_config.json", "open_clip_model.safetensors")


def settings(shards: Path, run: Path, batch: int) -> dict:
    """The run, as a recipe over configs/demo.yaml (nested keys) ..."""
    return {"data": {"train": str(shards), "batch_size": batch, "workers": 0, "shuffle_buffer": 1, "augment": False},
            "train": {"steps": STEPS, "log_every": 1, "threads": 1, "device": "cpu", "dist_timeout_s": 120},
            "optim": {"warmup_steps": 2}, "eval": {"zeroshot": "", "retrieval": ""}, "output_dir": str(run)}


def overrides(shards: Path, run: Path, batch: int) -> list[str]:
    """... and as clip-train's key=value arguments."""
    def flat(prefix: str, value) -> list[str]:
        if isinstance(value, dict):
            return [item for key, sub in value.items() for item in flat(f"{prefix}{key}.", sub)]
        text = str(value).lower() if isinstance(value, bool) else str(value)
        return [f"{prefix[:-1]}={text}"]
    return ["--config", DEMO_CONFIG, *flat("", settings(shards, run, batch))]


def write_recipe(path: Path, shards: Path, run: Path, batch: int) -> Path:
    path.write_text(yaml.safe_dump({"base": DEMO_CONFIG, **settings(shards, run, batch)}, sort_keys=False))
    return path


def assert_same_losses(run: Path, reference: list[tuple[int, float]]) -> None:
    losses = cf.read_losses(run)
    assert [step for step, _ in losses] == [step for step, _ in reference]
    for (step, loss), (_, expected) in zip(losses, reference):
        assert loss == pytest.approx(expected, rel=LOSS_RTOL), f"step {step}: {loss} vs single process {expected}"


def assert_exported(run: Path, reference_run: Path) -> None:
    """RUN/export holds an open_clip config and weights, with the reference run's tensor names and shapes."""
    from safetensors import safe_open

    for name in EXPORT_FILES:
        assert (run / "export" / name).is_file(), f"no export/{name} in {run}"
    assert json.loads((run / "export" / EXPORT_FILES[0]).read_text()) == \
        json.loads((reference_run / "export" / EXPORT_FILES[0]).read_text())

    def shapes(path: Path) -> dict:
        with safe_open(str(path / "export" / EXPORT_FILES[1]), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

    assert shapes(run) == shapes(reference_run)


def is_rank(argument: str):
    """A clip-train rank process of one run: ``python [-u] -m clip_train.cli ...`` with ``argument`` in its
    argv (launcher processes name clip_train.cli too, but are not a python running that module: srun's
    argv is ``srun ... python -m clip_train.cli ...``, DeepSpeed's ``python -m deepspeed.launcher.launch``)."""
    def match(info: cf.ProcInfo) -> bool:
        argv = info.argv
        return bool(argv) and Path(argv[0]).name.startswith("python") and argument in argv and \
            ["-m", "clip_train.cli"] in (argv[1:3], argv[2:4])
    return match


# --- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(demo_dataset, tmp_path_factory):
    """12 shards of 4 ``clip-prep demo`` training samples: one epoch is the 6 steps of 2 x 4."""
    return cf.repack_shards(demo_dataset / "train", tmp_path_factory.mktemp("cluster-data") / "shards",
                            shards=STEPS * WORLD, per_shard=PER_RANK_BATCH)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """One clip-train process with the global batch (2 x 4): the losses every cluster run must give."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = subprocess.run([sys.executable, "-m", "clip_train.cli", *overrides(shards, run, WORLD * PER_RANK_BATCH)],
                            env=cf.clean_environ(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = cf.read_losses(run)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1))
    return losses, run


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory):
    reason = cf.ssh_skip_reason()
    if reason:
        pytest.skip(f"multi-node launch over ssh: {reason}")
    with cf.ssh_nodes(tmp_path_factory.mktemp("ssh")) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def slurm():
    reason = cf.slurm_skip_reason()
    if reason:
        pytest.skip(f"SLURM: {reason}")
    with cf.slurm_cluster() as cluster:
        yield cluster


# --- two nodes over pdsh/ssh ---------------------------------------------------------------------------------------

def test_deepspeed_launcher_runs_one_rank_on_each_of_two_ssh_nodes(ssh_nodes, shards, reference, tmp_path):
    reference_losses, reference_run = reference
    work, run = tmp_path / "launch", tmp_path / "run"
    work.mkdir()
    (work / "hosts").write_text("clipnode1 slots=1\nclipnode2 slots=1\n")
    marker, other = f"forwarded-{uuid.uuid4().hex}", f"kept-here-{uuid.uuid4().hex}"
    port = cf.free_port()
    # Both variables exist only in the launching process's environment; only one is named with --env.
    env = cf.clean_environ(PATH=os.pathsep.join([str(ssh_nodes.path_dir), str(cf.VENV_BIN), os.environ["PATH"]]),
                           **{FORWARDED: marker, NOT_FORWARDED: other})
    forward = ["--env", FORWARDED] + (["--env", "TORCH_EXTENSIONS_DIR"] if "TORCH_EXTENSIONS_DIR" in env else [])
    command = [str(cf.VENV_BIN / "clip-launch"), "--hostfile", "hosts", "--master-port", str(port), *forward,
               "--", *overrides(shards, run, PER_RANK_BATCH)]
    log = tmp_path / "launch.log"
    ranks = cf.ProcessSampler(is_rank(f"output_dir={run}"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None:  # sample the rank processes while they run
            ranks.sample()
            assert time.monotonic() < deadline, f"clip-launch still running after {RUN_TIMEOUT_S}s\n" \
                                                f"{log.read_text()[-4000:]}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cf.kill_all(cf.processes_with_env(FORWARDED, marker))  # ranks and launchers left on the nodes
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, f"clip-launch exited {proc.returncode}\n{output[-4000:]}"

    # The run: the single process's losses, and an export.
    assert_same_losses(run, reference_losses)
    assert_exported(run, reference_run)

    running = next(line for line in output.splitlines() if line.startswith("clip-launch: running: deepspeed "))
    assert "--no_ssh_check" not in running  # two hosts: the runner's own `ssh clipnode1 hostname` check ran

    # One rank per node, each started through an ssh session to its own node's address.
    by_rank = {info.environ.get("RANK"): info.environ for info in ranks.found()}
    assert len(ranks.found()) == WORLD and sorted(by_rank) == ["0", "1"], \
        f"rank processes seen: {[(i.pid, i.argv) for i in ranks.found()]}"
    for rank, host in enumerate(["clipnode1", "clipnode2"]):
        rank_env = by_rank[str(rank)]
        assert (rank_env["WORLD_SIZE"], rank_env["CROSS_RANK"], rank_env["LOCAL_RANK"]) == ("2", str(rank), "0")
        assert (rank_env["MASTER_ADDR"], rank_env["MASTER_PORT"]) == ("clipnode1", str(port))
        server_address = rank_env["SSH_CONNECTION"].split()[2:]  # client ip, client port, server ip, server port
        assert server_address == [cf.NODES[host], str(ssh_nodes.port)], (rank, rank_env["SSH_CONNECTION"])
        # .deepspeed_env forwarding: the --env variable reached the rank; the other one did not.
        assert rank_env.get(FORWARDED) == marker, f"rank {rank} lacks {FORWARDED}"
        assert NOT_FORWARDED not in rank_env, f"rank {rank} inherited {NOT_FORWARDED} without --env"
        # pdsh prefixes each node's output with its host name.
        assert f"{host}: " in output and any(line.startswith(f"{host}: ") and f"node_rank={rank}" in line
                                             for line in output.splitlines()), output[-4000:]
    assert f"{FORWARDED}={marker}\n" in (work / ".deepspeed_env").read_text()
    assert NOT_FORWARDED not in (work / ".deepspeed_env").read_text()


# --- SLURM ---------------------------------------------------------------------------------------------------------

def sbatch_template(*args: str) -> str:
    return cf.run_checked([str(cf.VENV_BIN / "clip-launch"), "sbatch-template", *args]).stdout


def submit(slurm: cf.SlurmCluster, script: str, job_dir: Path, on_poll=None) -> tuple[str, str, str]:
    """sbatch the script from ``job_dir``; wait for the job; (job id, final state, its output file)."""
    (job_dir / "train.sbatch").write_text(script)
    # sbatch exports this environment to the job: PATH with the venv, SLURM_CONF, a free MASTER_PORT
    # (the script's default is 29500), TMPDIR for clip-launch's hostfile.
    env = {**slurm.env, "MASTER_PORT": str(cf.free_port()), "TMPDIR": str(job_dir)}
    job = cf.run_checked([cf.which("sbatch"), "--parsable", "train.sbatch"], cwd=job_dir, env=env).stdout.strip()
    job = job.split(";")[0]
    state = slurm.wait_job(job, RUN_TIMEOUT_S, on_poll=on_poll)
    output = next(job_dir.glob(f"*-{job}.out"), None)
    return job, state, output.read_text(errors="replace") if output else "(no job output file)"


def test_sbatch_template_for_cpu_nodes_runs_as_printed(slurm, shards, reference, tmp_path):
    reference_losses, reference_run = reference
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, run, WORLD * PER_RANK_BATCH)
    script = sbatch_template("--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "2", "--time", "0:10:00",
                             "--config", str(recipe), "--job-name", "clip-cpu")
    assert "--gres" not in script and "--gpus" not in script.replace("--num-gpus", "")
    job, state, output = submit(slurm, script, tmp_path)
    assert state == "COMPLETED", f"job {job}: {state}\n{output[-4000:]}\n{slurm.logs()}"
    # clip-launch --slurm read the allocation: one host (the node), one process on it.
    assert (tmp_path / f"clip-launch-{job}.hostfile").read_text() == f"{slurm.node} slots=1\n"
    assert "dist_world_size=1" in output
    assert_same_losses(run, reference_losses)
    assert_exported(run, reference_run)


SRUN_FORM = "# srun --kill-on-bad-exit=1 python -m clip_train.cli --config "


def one_task_per_rank(script: str, ranks: int) -> str:
    """The script's form (c), made as its comment says: ``--ntasks-per-node`` = ranks, the default
    ``clip-launch --slurm`` command commented out, the ``srun`` line uncommented."""
    lines = script.splitlines(keepends=True)
    header = "#SBATCH --ntasks-per-node=1\n"
    assert header in lines and sum(line.startswith(SRUN_FORM) for line in lines) == 1
    launch = lines.index(next(line for line in lines if line.startswith("clip-launch --slurm ")))
    edited = []
    for number, line in enumerate(lines):
        if line == header:
            line = f"#SBATCH --ntasks-per-node={ranks}\n"
        elif number in (launch, launch + 1):  # the command and its continuation line
            line = "# " + line
        elif line.startswith(SRUN_FORM):
            line = line[2:]
        edited.append(line)
    return "".join(edited)


def test_srun_one_task_per_rank_form_runs_two_ranks_from_slurm_variables(slurm, shards, reference, tmp_path):
    reference_losses, reference_run = reference
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", shards, run, PER_RANK_BATCH)
    script = one_task_per_rank(sbatch_template("--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1",
                                               "--time", "0:10:00", "--config", str(recipe), "--job-name", "clip-srun"),
                               ranks=WORLD)
    tasks = cf.ProcessSampler(is_rank(str(recipe)))
    job, state, output = submit(slurm, script, tmp_path, on_poll=tasks.sample)
    assert state == "COMPLETED", f"job {job}: {state}\n{output[-4000:]}\n{slurm.logs()}"
    assert slurm.job_field(job, "NumTasks") == str(WORLD)
    # Two srun tasks, whose ranks clip-train took from SLURM_PROCID/SLURM_NTASKS (srun sets no RANK).
    seen = sorted((info.environ.get("SLURM_PROCID"), info.environ.get("SLURM_NTASKS"), "RANK" in info.environ)
                  for info in tasks.found())
    assert seen == [("0", "2", False), ("1", "2", False)], \
        [(i.pid, i.ppid, i.argv[:4], i.environ.get("SLURM_PROCID")) for i in tasks.seen.values()]
    assert output.count(f"training {STEPS} steps ({STEPS} per epoch, contrastive batch {WORLD * PER_RANK_BATCH})") \
        == WORLD, output[-4000:]
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == WORLD * PER_RANK_BATCH
    assert_same_losses(run, reference_losses)
    assert_exported(run, reference_run)
