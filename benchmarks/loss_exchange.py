"""Ring vs all-gather block exchange of the distributed softmax contrastive loss (gloo, one machine).

Usage::

    python benchmarks/loss_exchange.py --worlds 2 4 8 --batches 16 64 256 --dim 512

For each world size W it spawns W gloo processes on this machine (loopback TCP, one torch
thread each) and, for each per-rank batch b, times forward + backward of
``softmax_contrastive_loss`` (float32, D = ``--dim``, default tile) with ``loss.exchange=ring``
and ``loss.exchange=allgather``.  A step is timed on rank 0 between two barriers, so it is the
slowest rank's step plus one barrier (the same for both exchanges); the two exchanges alternate
step by step after ``--warmup`` steps each, and the table shows the median over ``--steps``.
``max |grad diff|`` is the largest absolute difference, over all ranks, between the two
exchanges' image, text and logit-scale gradients for the same inputs.  The crossover is, per
W, the smallest per-rank batch from which the ring is at least as fast as the all-gather
(``none`` if the all-gather wins at every size measured).

With more ranks than cores (8 ranks on 2 cores) the processes time-share the CPUs: the
figures then include scheduling, which penalises the ring's W sequential hops the most.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip_train.losses import softmax_contrastive_loss  # noqa: E402

EXCHANGES = ("ring", "allgather")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _step(a, b, s, exchange):
    leaves = [x.clone().requires_grad_() for x in (a, b, s)]
    loss, _ = softmax_contrastive_loss(*leaves, exchange=exchange)
    loss.backward()
    return [x.grad for x in leaves]


def _worker(rank, world, port, batches, dim, steps, warmup, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    rows = []
    for n in batches:
        g = torch.Generator().manual_seed(1000 * rank + n)
        a, b = (torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1) for _ in range(2))
        s = torch.tensor(14.0)
        grads = {ex: _step(a, b, s, ex) for ex in EXCHANGES}
        diff = max((x - y).abs().max() for x, y in zip(grads["ring"], grads["allgather"]))
        diff = diff.reshape(1).double()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        times = {ex: [] for ex in EXCHANGES}
        for i in range(warmup + steps):
            for ex in EXCHANGES:
                dist.barrier()
                t0 = time.perf_counter()
                _step(a, b, s, ex)
                dist.barrier()
                if i >= warmup:
                    times[ex].append(time.perf_counter() - t0)
        rows.append((n, {ex: statistics.median(t) for ex, t in times.items()}, float(diff)))
    if rank == 0:
        torch.save(rows, os.path.join(outdir, f"world{world}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world, args, outdir):
    mp.spawn(_worker, args=(world, _free_port(), args.batches, args.dim, args.steps, args.warmup, outdir),
             nprocs=world, join=True)
    return torch.load(os.path.join(outdir, f"world{world}.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="per-rank batch sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per exchange (median)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, gloo over loopback, "
          f"torch {torch.__version__}, 1 thread per rank, float32, D={args.dim}, softmax fwd+bwd, "
          f"median of {args.steps} steps\n")
    print("| ranks | per-rank batch | global batch | ring ms | allgather ms | ring / allgather | max abs grad diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    crossovers = {}
    with tempfile.TemporaryDirectory() as outdir:
        for world in args.worlds:
            rows = run_world(world, args, outdir)
            crossovers[world] = next((n for n, t, _ in rows if t["ring"] <= t["allgather"]), None)
            for n, t, diff in rows:
                print(f"| {world} | {n} | {n * world} | {1e3 * t['ring']:.2f} | {1e3 * t['allgather']:.2f} | "
                      f"{t['ring'] / t['allgather']:.2f} | {diff:.1e} |", flush=True)
    print()
    for world, n in crossovers.items():
        where = f"ring as fast from per-rank batch {n}" if n else "none: allgather faster at every batch measured"
        print(f"crossover at {world} ranks: {where}")


if __name__ == "__main__":
    main()
