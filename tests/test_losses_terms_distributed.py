"""DCL, HN-NCE, uniformity and alignment under real gloo process groups (world sizes 2, 4).

One spawned job per world size (``dist_harness``, with the batches of ``test_losses_distributed``)
runs every term on even and uneven per-rank sizes, plus rank-dependent incoming gradients, with
both block exchanges (``ring`` and ``allgather``; alignment exchanges nothing); the parent
checks the engine's convention against the single-process naive references:
mean over ranks of the losses == full-batch loss, each rank's feature gradients ==
W x the full-batch gradients of its rows, mean over ranks of the scale gradients == the
single-process one.
"""
import pytest
import torch
from dist_harness import rank_rows, run_workers

from clip_train.losses import (
    alignment_loss,
    decoupled_contrastive_loss,
    hard_negative_contrastive_loss,
    naive_alignment_loss,
    naive_decoupled_contrastive_loss,
    naive_hard_negative_contrastive_loss,
    naive_uniformity_loss,
    uniformity_loss,
    uniformity_terms,
)
from test_losses_distributed import EXCHANGES, uneven_sizes
from test_losses_distributed import make_batch as base_batch

TILE = 5  # divides none of the per-rank sizes
HN = dict(beta_image=0.3, beta_text=0.7, alpha=0.6)
TERMS = ("dcl", "hn", "uniformity", "uniformity_terms", "alignment")


def ours(term, a, b, s, group=None, exchange="ring"):
    kw = dict(tile_size=TILE, group=group, exchange=exchange)
    if term == "dcl":
        return decoupled_contrastive_loss(a, b, s, **kw)
    if term == "hn":
        return hard_negative_contrastive_loss(a, b, s, **HN, **kw)
    if term == "uniformity":
        return uniformity_loss(a, t=2.0, **kw)
    if term == "uniformity_terms":
        return uniformity_terms(a, b, t=2.0, union_weight=0.5, **kw)
    return alignment_loss(a, b, alpha=1.5, group=group)


def naive(term, a, b, s):
    if term == "dcl":
        return naive_decoupled_contrastive_loss(a, b, s)[0]
    if term == "hn":
        return naive_hard_negative_contrastive_loss(a, b, s, **HN)[0]
    u = lambda x: naive_uniformity_loss(x, 2.0)[0]  # noqa: E731
    if term == "uniformity":
        return u(a)
    if term == "uniformity_terms":
        return (u(a) + u(b)) / 2 + 0.5 * u(torch.cat([a, b]))
    return naive_alignment_loss(a, b, 1.5)[0]


def run(fn, a, b, s, grad_out=1.0):
    leaves = [x.clone().requires_grad_() for x in (a, b, s)]
    loss = fn(*leaves)
    loss = loss[0] if isinstance(loss, tuple) else loss
    (loss * grad_out).backward()
    return loss.detach(), [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]


def make_batch(n, seed):
    a, b, s, _ = base_batch(n, seed)
    return a * 1.3, b, s  # image rows not unit norm: uniformity must not assume it


def child_scenarios(rank, world):
    out = {}
    for name, sizes in (("even", [6] * world), ("uneven", uneven_sizes(world))):
        a, b, s = make_batch(sum(sizes), seed=len(sizes) + sum(sizes))
        sl = rank_rows(sizes, rank)
        for term in TERMS:
            for ex in EXCHANGES:
                fn = lambda *x, term=term, ex=ex: ours(term, *x, exchange=ex)  # noqa: E731
                out[(name, term, ex)] = run(fn, a[sl], b[sl], s)
                if name == "uneven":  # backward of (rank + 1) * L_r on every rank
                    out[("weighted", term, ex)] = run(fn, a[sl], b[sl], s, grad_out=rank + 1.0)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def job(request, tmp_path_factory):
    world = request.param
    return world, run_workers(child_scenarios, world, tmp_path_factory.mktemp(f"terms_world{world}"))


def close(x, y, msg):
    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11, msg=msg)


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("name", ["even", "uneven"])
def test_mean_loss_and_grads_match_full_batch(job, term, name, exchange):
    world, results = job
    sizes = [6] * world if name == "even" else uneven_sizes(world)
    a, b, s = make_batch(sum(sizes), seed=len(sizes) + sum(sizes))
    ref_loss, ref_grads = run(lambda *x: naive(term, *x), a, b, s)
    per_rank = [res[(name, term, exchange)] for res in results]
    close(torch.stack([loss for loss, _ in per_rank]).mean(), ref_loss, f"{term} loss")
    for rank, (_, grads) in enumerate(per_rank):
        sl = rank_rows(sizes, rank)
        for i, which in enumerate(("image", "text")):
            close(grads[i], world * ref_grads[i][sl], f"{term} rank{rank} {which} grad")
    close(torch.stack([g[2] for _, g in per_rank]).mean(), ref_grads[2], f"{term} scale grad")


def per_rank_naive_losses(term, a, b, s, sizes):
    """Full-matrix ``L_r`` of every rank, as the modules document the per-rank share."""
    B, W = sum(sizes), len(sizes)
    if term in ("uniformity", "uniformity_terms"):
        full = naive(term, a, b, s)
        return [full] * W  # every rank returns the full value
    if term == "alignment":
        per_row = (a - b).pow(2).sum(1).pow(0.75)
        return [W / B * per_row[rank_rows(sizes, r)].sum() for r in range(W)]
    S = s * a @ b.T
    off = ~torch.eye(B, dtype=torch.bool)
    beta1, beta2, alpha = (0.0, 0.0, 0.0) if term == "dcl" else (HN["beta_image"], HN["beta_text"], HN["alpha"])

    def rows(M, beta):
        w = torch.exp(beta * M) * off
        w = w / (w.sum(1, keepdim=True) / (B - 1))
        return -M.diagonal() + torch.log(alpha * M.diagonal().exp() + (w * M.exp() * off).sum(1))

    terms = rows(S, beta1) + rows(S.T, beta2)
    return [W / (2.0 * B) * terms[rank_rows(sizes, r)].sum() for r in range(W)]


@pytest.mark.parametrize("term", TERMS)
def test_ring_and_allgather_agree(job, term):
    """Same losses and gradients from both exchanges on every rank, to 1e-10 in float64."""
    world, results = job
    for rank, res in enumerate(results):
        for name in ("even", "uneven", "weighted"):
            tol = dict(rtol=1e-10, atol=1e-10, msg=f"{term} {name} rank{rank}")
            torch.testing.assert_close(res[(name, term, "allgather")], res[(name, term, "ring")], **tol)


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("term", TERMS)
def test_rank_dependent_grad_outputs(job, term, exchange):
    """Backward of sum_r (r + 1) L_r: each rank's loss and gradients follow its share."""
    world, results = job
    sizes = uneven_sizes(world)
    leaves = [x.clone().requires_grad_() for x in make_batch(sum(sizes), seed=len(sizes) + sum(sizes))]
    losses = per_rank_naive_losses(term, *leaves, sizes)
    sum((r + 1.0) * loss for r, loss in enumerate(losses)).backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    for rank, res in enumerate(results):
        loss, ours_grads = res[("weighted", term, exchange)]
        close(loss, losses[rank].detach(), f"{term} rank{rank} loss")
        for i in range(2):
            close(ours_grads[i], grads[i][rank_rows(sizes, rank)], f"{term} rank{rank} grad {i}")
    close(torch.stack([res[("weighted", term, exchange)][1][2] for res in results]).sum(), grads[2],
          f"{term} scale")
