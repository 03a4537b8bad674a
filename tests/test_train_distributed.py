"""The trainer under two real gloo processes: DDP + the ring loss give the single-process update."""
import os
from pathlib import Path

import pytest
import torch
from dist_harness import free_port, run_workers
from project_paths import DEMO_CONFIG

from clip_train.config import load_config

GLOBAL_BATCH = 8
CAPTIONS = [f"a handwritten digit {i}" for i in range(GLOBAL_BATCH)]


PAIR_TERMS = ("objective.terms.dcl=0.5", "objective.terms.hard_negative=0.5", "objective.terms.uniformity=0.1",
              "objective.terms.alignment=0.1")
OBJECTIVES = {"softmax": ("loss.kind=softmax",), "sigmoid": ("loss.kind=sigmoid",),
              "softmax+pair-terms": ("loss.kind=softmax", *PAIR_TERMS)}


def make_config(demo: Path, run: Path, objective: str):
    return load_config(DEMO_CONFIG, [f"data.train={demo}/train", f"output_dir={run}", "data.workers=0",
                                     "data.batch_size=4", "loss.tile_size=3", "eval.zeroshot=", "eval.retrieval=",
                                     *OBJECTIVES[objective]])


def fixed_batch(tokenizer):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator), tokenizer(CAPTIONS)


def gradients_after_one_backward(cfg, rows: slice):
    from clip_train.engine.distributed import all_reduce_mean
    from clip_train.engine.trainer import Trainer

    trainer = Trainer(cfg)
    images, text = fixed_batch(trainer.built.tokenizer)
    loss, _ = trainer.forward_backward([{"image": images[rows], "text": text[rows]}])
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    return float(all_reduce_mean(loss)), grads  # the mean over ranks, as a logging step reports it


def rank_gradients(rank, world, demo, run, kind):
    per_rank = GLOBAL_BATCH // world
    return gradients_after_one_backward(make_config(demo, run, kind), slice(rank * per_rank, (rank + 1) * per_rank))


@pytest.mark.parametrize("kind", list(OBJECTIVES))
def test_two_rank_gradients_equal_single_process(demo_dataset, tmp_path, kind):
    single_loss, single_grads = gradients_after_one_backward(make_config(demo_dataset, tmp_path / "single", kind),
                                                             slice(0, GLOBAL_BATCH))
    results = run_workers(rank_gradients, 2, tmp_path, demo_dataset, tmp_path / "dist", kind, init="env", timeout=240,
                          weights_only=True)
    for loss, grads in results:
        assert loss == pytest.approx(single_loss, rel=1e-5)  # the logged loss is the full-batch loss
        for name, grad in single_grads.items():
            # fp32 sums taken in another order: the noise is relative to the tensor's scale, not to each
            # element (an element near zero of a gradient of size 2 differs by ~1e-6); a wrong term is O(1).
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_a_dead_rank_ends_the_job_instead_of_hanging_it(demo_dataset, tmp_path):
    import subprocess
    import sys
    import time

    port, run = free_port(), tmp_path / "run"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "clip_train.cli", "--config", DEMO_CONFIG, f"data.train={demo_dataset}/train",
             f"output_dir={run}", "data.workers=0", "data.batch_size=16", "train.steps=1000", "train.log_every=1",
             "train.dist_timeout_s=30", "eval.zeroshot=", "eval.retrieval="],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    procs[1].kill()
    killed_at = time.time()
    code = procs[0].wait(timeout=120)  # a hang would time out here
    assert code == 1 and time.time() - killed_at < 90
    last_line = procs[0].stderr.read().decode().strip().splitlines()[-1]
    assert last_line.startswith("clip-train: error: rank 0: a collective operation failed")
