"""Speed and peak extra memory of the tiled losses vs open_clip's ClipLoss / SigLipLoss (CPU).

Usage::

    python benchmarks/loss_memory.py --sizes 1024 4096 8192 --dim 512 --tile 1024

For each global batch size B (single process, fp32) it runs forward + backward of
``softmax_contrastive_loss`` vs ``open_clip.loss.ClipLoss`` and of
``sigmoid_contrastive_loss`` vs ``open_clip.loss.SigLipLoss`` and prints a markdown table
with the ratios ours / open_clip.

Time: median wall-clock of ``--repeats`` runs after one warm-up (no tracking active).

Memory: CPU torch has no allocator statistics and ``tracemalloc`` does not see torch's
allocations, so peak memory is measured with a ``TorchDispatchMode`` (:class:`LiveBytes`)
that sees every tensor produced by every aten op during forward and backward (autograd
included).  It counts a storage when an op first produces it (outputs that alias an
input, i.e. views and in-place ops, are not new allocations) and uncounts it when the
storage object is freed (``weakref.finalize``); the peak of that live total is the peak
*extra* memory of the loss, including the feature gradients it returns (2 B D floats for
both implementations).  Input features are allocated before tracking starts.  This is
deterministic, unlike RSS deltas, which glibc's allocator caching makes unreliable.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip_train.losses import sigmoid_contrastive_loss, softmax_contrastive_loss  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages allocated (and still alive) inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}

    def _free(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_flatten((args, kwargs))[0]
                  if isinstance(x, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in self.sizes or storage.nbytes() == 0:
                continue
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


def open_clip_losses():
    """open_clip's ``loss.py`` (loaded alone: the package import pulls in timm/torchvision)."""
    pkg_dir = os.path.dirname(importlib.util.find_spec("open_clip").origin)
    spec = importlib.util.spec_from_file_location("_open_clip_loss", os.path.join(pkg_dir, "loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ClipLoss(), module.SigLipLoss()


def make_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.nn.functional.normalize(torch.randn(2, n, d, generator=g), dim=-1)
    leaves = (a, b, torch.tensor(10.0), torch.tensor(-10.0))
    return [x.clone().requires_grad_() for x in leaves]


def fwd_bwd(fn, inputs):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    (out[0] if isinstance(out, tuple) else out).backward()


def measure(fn, inputs, repeats):
    """``(median seconds, peak extra bytes)`` of forward + backward."""
    fwd_bwd(fn, inputs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd_bwd(fn, inputs)
        times.append(time.perf_counter() - t0)
    for x in inputs:
        x.grad = None
    with LiveBytes() as tracker:
        fwd_bwd(fn, inputs)
    return statistics.median(times), tracker.peak


def rows_for_size(n, args, clip, siglip):
    inputs = make_inputs(n, args.dim)
    pairs = {
        "softmax": (lambda a, b, s, t: softmax_contrastive_loss(a, b, s, tile_size=args.tile),
                    lambda a, b, s, t: clip(a, b, s)),
        "sigmoid": (lambda a, b, s, t: sigmoid_contrastive_loss(a, b, s, t, tile_size=args.tile),
                    lambda a, b, s, t: siglip(a, b, s, t)),
    }
    rows = []
    for kind in args.losses:
        (t_ours, m_ours), (t_ref, m_ref) = (measure(f, inputs, args.repeats) for f in pairs[kind])
        mib = 2.0 ** 20
        rows.append(
            f"| {kind} | {n} | {args.dim} | {args.tile} | {t_ours * 1e3:.0f} | {t_ref * 1e3:.0f} | "
            f"{t_ours / t_ref:.2f} | {m_ours / mib:.1f} | {m_ref / mib:.1f} | {m_ours / m_ref:.3f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192], help="global batch sizes")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    p.add_argument("--tile", type=int, default=1024, help="tile size of our losses")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--losses", nargs="+", default=["softmax", "sigmoid"], choices=["softmax", "sigmoid"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clip, siglip = open_clip_losses()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU\n")
    print("| loss | B | D | tile | ours ms | open_clip ms | time ratio | ours peak MiB "
          "| open_clip peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        rows_for_size(n, args, clip, siglip)


if __name__ == "__main__":
    main()
