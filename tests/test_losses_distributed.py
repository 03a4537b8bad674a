"""Distributed tiled losses under real gloo process groups (world sizes 1, 2, 4).

One spawned job per world size runs every scenario (both losses, even and uneven
per-rank sizes, open_clip under gloo, a non-contiguous subgroup), each with both block
exchanges (``ring`` and ``allgather``), plus ``auto`` with a tiny and a large budget,
and saves the results; the parent recomputes single-process references and asserts.  A
failed or hung child fails the test (join timeout, exit codes, traceback file).
"""
import pytest
import torch
from dist_harness import rank_rows as rows
from dist_harness import run_workers
from loss_helpers import open_clip_loss_module

from clip_train.losses import (
    naive_sigmoid_contrastive_loss,
    naive_softmax_contrastive_loss,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)

D = 8
TILE = 5  # divides none of the per-rank sizes below
EXCHANGES = ("ring", "allgather")


def uneven_sizes(world):
    return [5, 9, 3, 7][:world] if world > 1 else [5]


def make_batch(n, seed):
    """Deterministic float64 full batch shared by parent and children."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    return a, b, torch.tensor(6.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)


def run_loss(kind, a, b, s, t, grad_out=1.0, **kw):
    """Loss + gradients (features, scale[, bias]) of one of our losses or a reference."""
    leaves = [x.clone().requires_grad_() for x in (a, b, s, t)]
    a, b, s, t = leaves
    if kind == "softmax":
        loss, metrics = softmax_contrastive_loss(a, b, s, **kw)
    elif kind == "sigmoid":
        loss, metrics = sigmoid_contrastive_loss(a, b, s, t, **kw)
    elif kind == "naive_softmax":
        loss, metrics = naive_softmax_contrastive_loss(a, b, s)
    else:
        loss, metrics = naive_sigmoid_contrastive_loss(a, b, s, t)
    (loss * grad_out).backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return {"loss": loss.detach(), "grads": grads, "metrics": metrics}


def run_open_clip(kind, a, b, s, t, rank, world):
    ocl = open_clip_loss_module()
    a, b, s, t = [x.clone().requires_grad_() for x in (a, b, s, t)]
    if kind == "softmax":
        fn = ocl.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        loss = fn(a, b, s)
    else:
        loss = ocl.SigLipLoss(rank=rank, world_size=world)(a, b, s, t)
    loss.backward()
    return {"loss": loss.detach(), "grads": [x.grad if x.grad is not None else torch.zeros_like(x) for x in (a, b, s, t)]}


def passes_run(fn):
    """``fn()``'s result and the exchange passes (``"ring"`` / ``"allgather"``) it ran."""
    from clip_train.losses import ring as ring_mod

    seen, originals = [], (ring_mod._ring_pass, ring_mod._allgather_pass)

    def spy(name, original):
        def wrapped(*args):
            seen.append(name)
            return original(*args)
        return wrapped

    ring_mod._ring_pass, ring_mod._allgather_pass = spy("ring", originals[0]), spy("allgather", originals[1])
    try:
        return fn(), seen
    finally:
        ring_mod._ring_pass, ring_mod._allgather_pass = originals


def child_scenarios(rank, world):
    """Everything a rank computes; keys are (name, kind, exchange)."""
    import torch.distributed as dist

    out = {}
    for name, sizes in (("even", [6] * world), ("uneven", uneven_sizes(world))):
        a, b, s, t = make_batch(sum(sizes), seed=len(sizes) + sum(sizes))
        sl = rows(sizes, rank)
        for kind in ("softmax", "sigmoid"):
            for ex in EXCHANGES:
                out[(name, kind, ex)] = run_loss(kind, a[sl], b[sl], s, t, tile_size=TILE, exchange=ex)
            if name == "even":
                out[("open_clip", kind)] = run_open_clip(kind, a[sl], b[sl], s, t, rank, world)
        # Rank-dependent incoming gradients: backward of (rank + 1) * L_r on every rank.
        for kind in ("softmax", "sigmoid") if name == "uneven" else ():
            for ex in EXCHANGES:
                out[("weighted", kind, ex)] = run_loss(kind, a[sl], b[sl], s, t, tile_size=TILE,
                                                       grad_out=rank + 1.0, exchange=ex)
        if name == "uneven":  # auto: which passes a tiny and a large budget run
            for budget in (1e-6, 1024.0):
                for kind in ("softmax", "sigmoid"):
                    out[("auto", kind, budget)] = passes_run(lambda: run_loss(
                        kind, a[sl], b[sl], s, t, tile_size=TILE, exchange="auto", exchange_memory_mb=budget))
    if world == 4:  # non-contiguous subgroups {0, 2} and {1, 3}: P2P peers are global ranks
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        sizes = [4, 7]
        a, b, s, t = make_batch(sum(sizes), seed=99 + rank % 2)
        sl = rows(sizes, rank // 2)
        for kind in ("softmax", "sigmoid"):
            for ex in EXCHANGES:
                out[("subgroup", kind, ex)] = run_loss(kind, a[sl], b[sl], s, t, tile_size=3,
                                                       group=groups[rank % 2], exchange=ex)
    return out


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"world{w}")
def job(request, tmp_path_factory):
    world = request.param
    return world, run_workers(child_scenarios, world, tmp_path_factory.mktemp(f"world{world}"))


def close(x, y, msg):
    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11, msg=msg)


def check_convention(results, key, sizes, full_batch, kind):
    """mean_r loss == full loss; feature grads == W x full grads of the rank's rows;
    mean_r scale/bias grads == full ones."""
    world = len(results)
    ref = run_loss("naive_" + kind, *full_batch)
    per_rank = [res[key] for res in results]
    close(torch.stack([r["loss"] for r in per_rank]).mean(), ref["loss"], f"{key} loss")
    for rank, r in enumerate(per_rank):
        sl = rows(sizes, rank)
        for i, name in enumerate(("image", "text")):
            close(r["grads"][i], world * ref["grads"][i][sl], f"{key} rank{rank} {name} grad")
    n_scalars = 2 if kind == "sigmoid" else 1
    for i in range(2, 2 + n_scalars):
        mean_grad = torch.stack([r["grads"][i] for r in per_rank]).mean()
        close(mean_grad, ref["grads"][i], f"{key} scalar grad {i}")


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("name", ["even", "uneven"])
def test_ring_matches_full_batch(job, kind, name, exchange):
    world, results = job
    sizes = [6] * world if name == "even" else uneven_sizes(world)
    full = make_batch(sum(sizes), seed=len(sizes) + sum(sizes))
    check_convention(results, (name, kind, exchange), sizes, full, kind)


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_matches_open_clip_under_gloo(job, kind, exchange):
    """Same per-rank loss and feature grads as open_clip (ClipLoss(local_loss,
    gather_with_grad) / SigLipLoss bidir) on equal-size ranks; same mean scale/bias grads
    (and, for the sigmoid loss, the same per-rank ones: both are d L_r / d(s, t))."""
    world, results = job
    for rank, res in enumerate(results):
        ours, ref = res[("even", kind, exchange)], res[("open_clip", kind)]
        close(ours["loss"], ref["loss"], f"rank{rank} loss")
        n = 4 if kind == "sigmoid" else 2
        for i in range(n):
            close(ours["grads"][i], ref["grads"][i], f"rank{rank} grad {i}")
    for i in range(2, 4 if kind == "sigmoid" else 3):
        ours_mean = torch.stack([res[("even", kind, exchange)]["grads"][i] for res in results]).mean()
        ref_mean = torch.stack([res[("open_clip", kind)]["grads"][i] for res in results]).mean()
        close(ours_mean, ref_mean, f"mean scalar grad {i}")


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_on_subgroup(job, kind, exchange):
    world, results = job
    if world != 4:
        pytest.skip("subgroups are exercised in the 4-rank job")
    sizes = [4, 7]
    for parity in (0, 1):
        members = [results[parity], results[parity + 2]]
        full = make_batch(sum(sizes), seed=99 + parity)
        check_convention(members, ("subgroup", kind, exchange), sizes, full, kind)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_and_allgather_agree(job, kind):
    """Same loss, metrics and gradients (features, scale, bias) from both exchanges, on every
    rank and scenario, to 1e-10 in float64 (only the order of the merges differs)."""
    world, results = job
    names = ["even", "uneven", "weighted"] + (["subgroup"] if world == 4 else [])
    for rank, res in enumerate(results):
        for name in names:
            ring, gathered = res[(name, kind, "ring")], res[(name, kind, "allgather")]
            tol = dict(rtol=1e-10, atol=1e-10, msg=f"{name} rank{rank}")
            torch.testing.assert_close(gathered["loss"], ring["loss"], **tol)
            torch.testing.assert_close(gathered["grads"], ring["grads"], **tol)
            torch.testing.assert_close(gathered["metrics"], ring["metrics"], **tol)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_auto_picks_ring_under_a_small_budget_and_allgather_under_a_large_one(job, kind):
    """Forward and backward both follow the choice, the same on every rank (uneven sizes),
    and the results are those of the chosen exchange."""
    world, results = job
    for res in results:
        for budget, chosen in ((1e-6, "ring"), (1024.0, "allgather")):
            out, passes = res[("auto", kind, budget)]
            assert passes == ([chosen] * 2 if world > 1 else []), (budget, passes)
            ref = res[("uneven", kind, chosen)]
            torch.testing.assert_close(out["grads"], ref["grads"], rtol=1e-13, atol=1e-14)


def test_metrics_are_per_rank_rows(job):
    """pos/neg logit means over a rank's rows; rank-size-weighted they give the global ones."""
    world, results = job
    sizes = uneven_sizes(world)
    full = make_batch(sum(sizes), seed=len(sizes) + sum(sizes))
    B = sum(sizes)
    for kind, ex in ((k, e) for k in ("softmax", "sigmoid") for e in EXCHANGES):
        ref = run_loss("naive_" + kind, *full)["metrics"]
        ms = [res[("uneven", kind, ex)]["metrics"] for res in results]
        pos = sum(m["pos_logit_mean"] * n for m, n in zip(ms, sizes)) / B
        neg = sum(m["neg_logit_mean"] * n * (B - 1) for m, n in zip(ms, sizes)) / (B * (B - 1))
        close(pos, ref["pos_logit_mean"], f"{kind} {ex} pos")
        close(neg, ref["neg_logit_mean"], f"{kind} {ex} neg")


def per_rank_losses(kind, a, b, s, t, sizes):
    """Full-matrix L_r of every rank (the decomposition documented in the loss modules)."""
    B, W = sum(sizes), len(sizes)
    S = s * a @ b.T
    if kind == "softmax":
        terms = (S.logsumexp(1) - S.diagonal()) + (S.logsumexp(0) - S.diagonal())
        weight = W / (2.0 * B)
    else:
        terms = torch.nn.functional.softplus(S + t).sum(1) - (S.diagonal() + t)
        weight = W / B
    return [weight * terms[rows(sizes, r)].sum() for r in range(W)]


@pytest.mark.parametrize("exchange", EXCHANGES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_with_rank_dependent_grad_outputs(job, kind, exchange):
    """Backward of sum_r (r + 1) L_r: column gradients must use the owner's weight."""
    world, results = job
    sizes = uneven_sizes(world)
    leaves = [x.clone().requires_grad_() for x in make_batch(sum(sizes), seed=len(sizes) + sum(sizes))]
    losses = per_rank_losses(kind, *leaves, sizes)
    sum((r + 1.0) * loss for r, loss in enumerate(losses)).backward()
    for rank, res in enumerate(results):
        ours = res[("weighted", kind, exchange)]
        close(ours["loss"], losses[rank].detach(), f"rank{rank} loss")
        for i in range(2):
            close(ours["grads"][i], leaves[i].grad[rows(sizes, rank)], f"rank{rank} grad {i}")
    n = 4 if kind == "sigmoid" else 3
    for i in range(2, n):
        total = torch.stack([res[("weighted", kind, exchange)]["grads"][i] for res in results]).sum()
        close(total, leaves[i].grad, f"summed scalar grad {i}")
