"""Every ZeRO stage x precision at 2 ranks, as a cluster runs it: ``clip-train`` processes under gloo.

Each cell runs the real CLI twice (``matrix_worker.py`` adds probes, see its docstring): a run that
checkpoints at step 10, evaluates at step 10 and is killed with SIGKILL right after step 18, and a
``--resume latest`` run that finishes the 20 steps. The same 20 steps in one process, with the same
global batch and precision, are the reference. In every cell:

* losses match the single-process run: fp32 to 1e-5 relative (measured: 1.3e-7); bf16 to 3e-3
  (measured: up to 1.0e-3 over the 20 steps). bf16 keeps 8 mantissa bits, so every activation
  and weight copy rounds at up to 2^-9 = 2e-3 relative, and the two runs round in different orders
  (a split batch, a ring of partial sums, partitioned masters); 3e-3 is that unit with a margin,
  tight enough to catch a wrong logit scale (a ZeRO-3 clamp bug showed as 5.7e-3);
* the resumed run repeats the killed run's steps 11-18 exactly (the same processes, the same order);
* the in-training eval at step 10 logs its metrics, and the final eval too;
* the logit scale clamp holds in the fp32 master after every step: the limit, 10, is below the
  initial 14.3, so the first step pushes the scale past it; a clamp of the module copy alone would
  leave the master near 14.3 (and DeepSpeed would copy it back at the next step);
* step 15 has a NaN gradient with a finite loss: it is skipped, the masters do not change, and it is
  counted in ``skipped_steps``;
* the last checkpoint's ``weights.safetensors`` equals the fp32 masters (and, for ZeRO >= 1,
  DeepSpeed's own consolidation of its partitions).

Two more cells run the same checks with GradCache (``train.accum_steps=2``, half the rows per
micro-batch): the contrastive batch, and so the losses, are those of the reference.
"""
import json
import math
import os
import sys
from pathlib import Path

import preloaded
import pytest
from dist_harness import free_port
from project_paths import DEMO_CONFIG

WORKER = Path(__file__).with_name("matrix_worker.py")
STEPS, KILL_AT, NAN_AT, CHECKPOINT_EVERY = 20, 18, 15, 10
PER_RANK_BATCH, WORLD = 8, 2
MAX_LOGIT_SCALE = 10.0
LOSS_RTOL = {"fp32": 1e-5, "bf16": 3e-3}
RUN_TIMEOUT_S = 300


def clip_train_args(demo: Path, run: Path, precision: str, zero: int, batch: int, *extra: str) -> list[str]:
    return ["--config", DEMO_CONFIG, f"data.train={demo}/train", f"output_dir={run}", f"data.batch_size={batch}",
            "data.workers=0", f"train.steps={STEPS}", "train.log_every=1", "train.threads=1", "train.dist_timeout_s=120",
            f"checkpoint.every_steps={CHECKPOINT_EVERY}", "checkpoint.keep=0", f"eval.every={CHECKPOINT_EVERY}",
            f"eval.zeroshot={demo}/test", f"eval.retrieval={demo}/retrieval", "eval.batch_size=128",
            f"ds.precision={precision}", f"ds.zero_stage={zero}", f"model.max_logit_scale={MAX_LOGIT_SCALE}",
            "optim.lr=1e-3", "optim.warmup_steps=2", "loss.tile_size=5", *extra]


def launch(report: Path, args: list[str], world: int, kill_at: int = 0) -> None:
    """``world`` worker processes (rank env as a launcher sets it); waits and checks exit codes."""
    port, procs, logs = free_port(), [], []
    report.mkdir(parents=True, exist_ok=True)
    launch_index = len(list(report.glob("launch*-rank0.log")))
    for rank in range(world):
        env = dict(os.environ)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        logs.append(report / f"launch{launch_index}-rank{rank}.log")
        procs.append(preloaded.start([sys.executable, str(WORKER), str(report), str(kill_at or 10**9), str(NAN_AT),
                                      "--", *args], logs[-1], env))
    codes = [preloaded.wait(p, RUN_TIMEOUT_S) for p in procs]
    expected = -9 if kill_at else 0
    assert codes == [expected] * world, f"exit codes {codes}\n" + "\n".join(preloaded.tail(log) for log in logs)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def reference(demo_dataset, tmp_path_factory):
    """The single-process run of each precision (batch = WORLD x PER_RANK_BATCH), run once."""
    cache = {}

    def get(precision: str) -> dict[int, float]:
        if precision not in cache:
            run = tmp_path_factory.mktemp(f"reference-{precision}")
            launch(run / "report", clip_train_args(demo_dataset, run / "run", precision, 0, WORLD * PER_RANK_BATCH), 1)
            cache[precision] = dict(train_losses(read_jsonl(run / "run" / "metrics.jsonl")))
        return cache[precision]

    return get


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_cell(demo_dataset, tmp_path, reference, zero, precision):
    check_cell(demo_dataset, tmp_path, reference, zero, precision)


@pytest.mark.parametrize("zero, precision", [(3, "fp32"), (1, "bf16")])
def test_gradcache_cell(demo_dataset, tmp_path, reference, zero, precision):
    """GradCache: 2 ranks x 2 micro-batches of 4 rows, the same global batch of 16 as the reference."""
    check_cell(demo_dataset, tmp_path, reference, zero, precision, accum=2)


def check_cell(demo_dataset, tmp_path, reference, zero, precision, accum=1):
    run, report = tmp_path / "run", tmp_path / "report"
    args = clip_train_args(demo_dataset, run, precision, zero, PER_RANK_BATCH // accum, f"train.accum_steps={accum}")
    launch(report, args, WORLD, kill_at=KILL_AT)
    killed = read_jsonl(run / "metrics.jsonl")
    launch(report, [*args, "--resume", "latest"], WORLD)
    records = read_jsonl(run / "metrics.jsonl")
    resumed = records[len(killed):]

    # Losses: the killed run's 1..18 and the resumed run's 11..20 against the single-process run.
    before, after = dict(train_losses(killed)), dict(train_losses(resumed))
    assert sorted(before) == list(range(1, KILL_AT + 1)) and sorted(after) == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
    expected = reference(precision)
    for step, loss in [*before.items(), *after.items()]:
        assert loss == pytest.approx(expected[step], rel=LOSS_RTOL[precision]), f"step {step}"
    # kill -9 / resume: the overlapping steps are the same computation, so bit-identical.
    assert [after[s] for s in range(CHECKPOINT_EVERY + 1, KILL_AT + 1)] == \
        [before[s] for s in range(CHECKPOINT_EVERY + 1, KILL_AT + 1)]

    # Evaluation during training (step 10, before the kill) and at the end.
    evals = [r for r in records if "zeroshot/acc1" in r]
    assert [r["step"] for r in evals] == [CHECKPOINT_EVERY, STEPS]
    assert all(0.0 <= r["zeroshot/acc1"] <= 1.0 for r in evals) and "retrieval/image_retrieval_recall@1" in evals[-1]
    assert not any("eval_error" in r for r in records)

    # The clamp holds in the fp32 master, and the logged scale is the clamped one.
    steps = read_jsonl(report / "steps.jsonl")
    assert steps[0]["master_log_scale"] == pytest.approx(math.log(MAX_LOGIT_SCALE), abs=1e-7)  # clamped at step 1
    assert all(s["master_log_scale"] <= math.log(MAX_LOGIT_SCALE) + 1e-7 for s in steps)
    logged = [r["logit_scale"] for r in records if "logit_scale" in r]
    assert logged[0] == pytest.approx(MAX_LOGIT_SCALE, rel=1e-6) and max(logged) <= MAX_LOGIT_SCALE * (1 + 1e-6)

    # The NaN-gradient step is skipped on every rank, in both runs' accounting.
    by_step = {}
    for s in steps:
        by_step.setdefault(s["step"], s)
    assert not by_step[NAN_AT]["applied"] and by_step[NAN_AT]["checksum"] == by_step[NAN_AT - 1]["checksum"]
    assert all(by_step[s]["applied"] for s in by_step if s != NAN_AT)
    final_step = [r for r in records if r.get("step") == STEPS and "loss" in r][-1]
    assert final_step["skipped_steps"] == 1

    # The checkpoint holds the fp32 masters.
    final = json.loads((report / "final.json").read_text())
    assert final["mismatched"] == [] and final["keys"] > 0
    if zero >= 1:
        assert_deepspeed_consolidation_equals_weights(run / "checkpoints" / f"step_{STEPS:08d}")


def assert_deepspeed_consolidation_equals_weights(checkpoint: Path) -> None:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ours = load_file(str(checkpoint / "weights.safetensors"))
    for name, value in get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds").items():
        assert torch.equal(ours[name], value.float()), name
