"""Runs the Triton backend under Triton's CPU interpreter, in a process of its own.

    TRITON_INTERPRET=1 python tests/triton_interpret_worker.py OUT.pt

``TRITON_INTERPRET=1`` must be in the environment before *triton itself* is first imported (its
own ``@triton.jit`` helpers such as ``tl.zeros`` are defined then); a pytest process has usually
imported it already (DeepSpeed does), so ``test_loss_triton.py`` starts this script as a fresh
process and compares what it saves with the references it computes itself.  The helpers below
import nothing of Triton, so the test module imports them too.
"""
import os
import sys

import torch

SCALARS = {"softmax": 1, "sigmoid": 2}
# (n, D): n and D not multiples of the 16-wide CPU blocks; one row; D below one block.
CASES = [(37, 40), (1, 24), (18, 8)]
DIST_SIZES = [5, 19]  # uneven ranks; 19 rows span two 16-row blocks
DIST_D = 24


def make_inputs(n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.nn.functional.normalize(torch.randn(2, n, d, generator=g, dtype=torch.float64), dim=2)
    s, t = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    return [a.to(dtype), b.to(dtype), s, t]


def run(kind, inputs, grad_out=1.0, open_clip=None, **kw):
    """``([loss, grad a, grad b, grad scale(, grad bias)], metrics)``; ``kw`` go to our loss, or
    ``open_clip`` (open_clip's loss module) runs its ``ClipLoss`` / ``SigLipLoss`` instead."""
    from clip_train.losses import sigmoid_contrastive_loss, softmax_contrastive_loss

    leaves = [x.clone().requires_grad_() for x in inputs[: 2 + SCALARS[kind]]]
    metrics = None
    if open_clip is not None:
        loss = (open_clip.ClipLoss() if kind == "softmax" else open_clip.SigLipLoss())(*leaves)
    elif kind == "softmax":
        loss, metrics = softmax_contrastive_loss(*leaves, **kw)
    else:
        loss, metrics = sigmoid_contrastive_loss(*leaves, **kw)
    (loss * grad_out).backward()
    return [loss.detach()] + [x.grad for x in leaves], metrics


def _dist_child(rank, world):
    from dist_harness import rank_rows

    a, b, s, t = make_inputs(sum(DIST_SIZES), DIST_D, seed=3)
    sl = rank_rows(DIST_SIZES, rank)
    return {(kind, ex): run(kind, [a[sl], b[sl], s, t], backend="triton", exchange=ex)[0]
            for kind in ("softmax", "sigmoid") for ex in ("ring", "allgather")}


def main(out_path):
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 in the environment"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # dist_harness, preloaded
    out = {}
    for kind in ("softmax", "sigmoid"):
        for n, d in CASES:
            out[("float64", kind, n, d)] = run(kind, make_inputs(n, d), backend="triton")
        out[("float32", kind)] = run(kind, make_inputs(37, 40, torch.float32), grad_out=-2.5, backend="triton")
        out[("bf16", kind)] = run(kind, make_inputs(37, 40, torch.bfloat16), backend="triton")
    from dist_harness import run_workers

    out["gloo"] = run_workers(_dist_child, 2, os.path.dirname(os.path.abspath(out_path)))
    torch.save(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
