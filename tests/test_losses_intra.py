"""Intra-modal NT-Xent (tiled, ring), embedding-dropout views and text views.

Single process: float64 parity (forward, gradients, metrics) with the naive full-matrix
reference, hand-computed closed forms, N=1, bf16, gradcheck, a dispatch-mode proof that no
2N x 2N tensor exists.  Distributed: one spawned gloo job per world size (2, 4) computes
even / uneven / rank-weighted scenarios and saves them; the parent checks the convention
(mean of per-rank losses == full loss; each rank's grads == W x single-process grads).
"""
import math
import random

import pytest
import torch
from dist_harness import rank_rows as rows
from dist_harness import run_workers
from loss_helpers import OpRecorder

from clip_train.data.text_views import two_text_views, word_dropout
from clip_train.losses import embed_dropout_loss, embedding_dropout_views, naive_nt_xent_loss, nt_xent_loss

D = 8
TAU = 0.1
CASES = [(37, 8), (5, 16), (1, 16), (1, 1), (24, 24), (13, 5)]  # (items N, tile)


def make_views(n, d=D, dtype=torch.float64, seed=0):
    """Unnormalised views (the loss normalises); view2 correlated with view1."""
    g = torch.Generator().manual_seed(seed)
    v1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    v2 = v1 + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return v1.to(dtype), (3.0 * v2).to(dtype)


def run(fn, v1, v2, grad_out=1.0, **kw):
    leaves = [v1.clone().requires_grad_(), v2.clone().requires_grad_()]
    loss, metrics = fn(*leaves, **kw)
    (loss * grad_out).backward()
    return {"loss": loss.detach(), "grads": [x.grad for x in leaves], "metrics": metrics}


def tiled(tile, tau=TAU):
    return lambda a, b, **kw: nt_xent_loss(a, b, temperature=tau, tile_size=tile, **kw)


def naive(tau=TAU):
    return lambda a, b: naive_nt_xent_loss(a, b, temperature=tau)


def close(x, y, msg="", rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=msg)


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("n,tile", CASES)
def test_float64_parity_with_naive(n, tile):
    v1, v2 = make_views(n)
    ours, ref = run(tiled(tile), v1, v2), run(naive(), v1, v2)
    close(ours["loss"], ref["loss"])
    for g, r in zip(ours["grads"], ref["grads"]):
        close(g, r)
    for key in ("loss", "pos_sim_mean", "neg_sim_mean"):
        close(ours["metrics"][key], ref["metrics"][key], key)
        assert not ours["metrics"][key].requires_grad


def test_single_item_loss_is_zero():
    """N=1: the denominator holds only the positive, so every term is log 1 = 0."""
    v1, v2 = make_views(1)
    out = run(tiled(4), v1, v2)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-12)
    for g in out["grads"]:
        close(g, torch.zeros_like(g))


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_hand_computed_examples(tau):
    """z = normalize([x; x']) on the axes (scaled inputs: normalisation is inside)."""
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    # Aligned views [e1, e2] / [e1, e2]: each row sees its positive (1) and two zeros.
    loss, _ = nt_xent_loss(torch.stack([3 * e1, 2 * e2]), torch.stack([e1, 5 * e2]), temperature=tau, tile_size=1)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-12)
    # Swapped views [e1, e2] / [e2, e1]: positives orthogonal, one negative equal to the row.
    loss, _ = nt_xent_loss(torch.stack([e1, e2]), torch.stack([e2, e1]), temperature=tau, tile_size=3)
    assert loss.item() == pytest.approx(math.log(2 + math.exp(1 / tau)), rel=1e-12)


def test_gradcheck_and_grad_output_scaling():
    v1, v2 = [x.requires_grad_() for x in make_views(5, d=3)]
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, temperature=0.3, tile_size=2)[0], (v1, v2))
    v1, v2 = make_views(11)
    ours, ref = run(tiled(4), v1, v2, grad_out=-2.5), run(naive(), v1, v2, grad_out=-2.5)
    for g, r in zip(ours["grads"], ref["grads"]):
        close(g, r)


def test_never_allocates_full_matrix():
    n, tile = 128, 32
    v1, v2 = make_views(n, dtype=torch.float32)
    with OpRecorder() as ours:
        run(tiled(tile), v1, v2)
    with OpRecorder() as ref:
        run(naive(), v1, v2)
    assert ours.max_numel < (2 * n) ** 2
    assert ours.max_numel <= max(tile * tile, 2 * n * D), ours.max_numel  # a tile or the 2N x D views
    assert ref.max_numel >= (2 * n) ** 2  # the recorder does see the full matrix when there is one


def test_bf16_close_to_float64_with_float32_stats():
    v1, v2 = make_views(70, dtype=torch.bfloat16)
    with OpRecorder() as rec:
        ours = run(tiled(16, tau=0.2), v1, v2)
    ref = run(naive(tau=0.2), v1.double(), v2.double())
    assert ours["loss"].dtype == torch.float32 and [g.dtype for g in ours["grads"]] == [torch.bfloat16] * 2
    for op in ("logaddexp", "logsumexp", "exp_"):
        assert rec.dtypes[op] == {torch.float32}, (op, rec.dtypes[op])
    close(ours["loss"].double(), ref["loss"], rtol=5e-3, atol=5e-3)
    for g, r in zip(ours["grads"], ref["grads"]):
        assert (g.double() - r).abs().max() / r.abs().max() < 3e-2


@pytest.mark.parametrize(
    "shapes,kw,match",
    [
        (((4, 8), (5, 8)), {}, "views"),
        (((0, 8), (0, 8)), {}, "at least one row"),
        (((4, 8), (4, 8)), {"tile_size": 0}, "tile_size"),
        (((4, 8), (4, 8)), {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_inputs_raise_clearly(shapes, kw, match):
    with pytest.raises(ValueError, match=match):
        nt_xent_loss(torch.randn(shapes[0]), torch.randn(shapes[1]), **kw)


# ----------------------------------------------------------------------------- embedding dropout


def test_dropout_views_differ_and_are_reproducible():
    x = torch.randn(16, 32)
    a, b = embedding_dropout_views(x, p=0.3)
    assert not torch.equal(a, b)
    assert set(((a != 0) | (x == 0)).flatten().tolist()) == {True, False}  # some zeros, not all
    kept = a != 0
    close(a[kept], x[kept] / 0.7, rtol=1e-6, atol=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for u, v in zip(embedding_dropout_views(x, 0.3, g1), embedding_dropout_views(x, 0.3, g2)):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="p"):
        embedding_dropout_views(x, p=1.0)


def test_dropout_p0_equals_nt_xent_of_identical_views():
    x, _ = make_views(9)
    loss, _ = embed_dropout_loss(x, p=0.0, temperature=TAU, tile_size=4)
    ref, _ = nt_xent_loss(x, x.clone(), temperature=TAU, tile_size=4)
    close(loss, ref)


def test_dropout_loss_gradient_flows_to_features():
    x = make_views(12)[0].requires_grad_()
    loss, metrics = embed_dropout_loss(x, p=0.2, temperature=TAU, tile_size=5,
                                       generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert metrics["loss"].item() == pytest.approx(loss.item())


# ----------------------------------------------------------------------------- text views

CAPTION = "a small brown dog runs across the green park"


def test_word_dropout_deterministic_and_drops_words():
    views = [word_dropout(CAPTION, 0.5, random.Random(7)) for _ in range(2)]
    assert views[0] == views[1]
    rng = random.Random(1)
    many = {word_dropout(CAPTION, 0.5, rng) for _ in range(20)}
    assert len(many) > 1
    for v in many:  # a subsequence of the caption's words
        it = iter(CAPTION.split())
        assert all(w in it for w in v.split())


def test_word_dropout_never_empty_and_min_words():
    rng = random.Random(0)
    for caption in ("dog", "two words", CAPTION):
        for _ in range(20):
            assert word_dropout(caption, 1.0, rng).strip()
            assert len(word_dropout(caption, 1.0, rng, min_words=2).split()) == min(2, len(caption.split()))
    assert word_dropout("   ", 0.5, rng) == "   "


def test_word_dropout_p0_is_identity():
    caption = "  odd   spacing\tkept  "
    assert word_dropout(caption, 0.0, random.Random(0)) == caption


def test_two_text_views():
    # Several captions (a list or newline-separated): two different ones.
    for sample in (["a cat", "a kitten on a mat", "a cat"], "a cat\n\na kitten on a mat\n"):
        for seed in range(10):
            v1, v2 = two_text_views(sample, 0.3, random.Random(seed))
            assert v1 != v2 and {v1, v2} == {"a cat", "a kitten on a mat"}
    # One caption: two word-dropout views, reproducible with a seed.
    v = two_text_views(CAPTION, 0.3, random.Random(5))
    assert v == two_text_views([CAPTION], 0.3, random.Random(5))
    assert all(x.strip() for x in v)
    assert two_text_views(CAPTION, 0.0, random.Random(0)) == (CAPTION, CAPTION)
    with pytest.raises(ValueError, match="no non-blank caption"):
        two_text_views(["", "  "], 0.1, random.Random(0))


# ----------------------------------------------------------------------------- distributed

DIST_TILE = 3  # divides none of the per-rank row counts below


def sizes_for(name, world):
    return [6] * world if name == "even" else [5, 9, 3, 7][:world]


def full_views(sizes):
    return make_views(sum(sizes), seed=len(sizes) * 10 + sum(sizes))


def child_scenarios(rank, world):
    out = {}
    for name in ("even", "uneven"):
        sizes = sizes_for(name, world)
        v1, v2 = full_views(sizes)
        sl = rows(sizes, rank)
        out[name] = run(tiled(DIST_TILE), v1[sl], v2[sl])
        if name == "uneven":  # rank-dependent incoming gradients: backward of (r + 1) L_r
            out["weighted"] = run(tiled(DIST_TILE), v1[sl], v2[sl], grad_out=rank + 1.0)
            out["bf16"] = run(tiled(DIST_TILE), v1[sl].bfloat16(), v2[sl].bfloat16())
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def job(request, tmp_path_factory):
    world = request.param
    return world, run_workers(child_scenarios, world, tmp_path_factory.mktemp(f"intra_world{world}"))


@pytest.mark.parametrize("name", ["even", "uneven"])
def test_ring_matches_full_batch(job, name):
    world, results = job
    sizes = sizes_for(name, world)
    ref = run(naive(), *full_views(sizes))
    close(torch.stack([r[name]["loss"] for r in results]).mean(), ref["loss"], f"{name} loss")
    for rank, res in enumerate(results):
        for i in range(2):
            close(res[name]["grads"][i], world * ref["grads"][i][rows(sizes, rank)], f"rank{rank} grad{i}")
    # Metrics are means over a rank's rows: weighted by rank size they give the global ones.
    for key in ("pos_sim_mean", "neg_sim_mean"):
        mean = sum(r[name]["metrics"][key] * n for r, n in zip(results, sizes)) / sum(sizes)
        close(mean, ref["metrics"][key], key)


def per_rank_losses(v1, v2, sizes, tau=TAU):
    """Full-matrix ``L_r = W/(2N) sum_{i in r} (lse_i - S_{i,p(i)})`` (module docstring)."""
    z = torch.nn.functional.normalize(torch.cat([v1, v2]), dim=1)
    n, W = v1.shape[0], len(sizes)
    S = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    terms = S.logsumexp(1) - S[torch.arange(2 * n), partner]
    terms = terms[:n] + terms[n:]
    return [W / (2.0 * n) * terms[rows(sizes, r)].sum() for r in range(W)]


def test_ring_with_rank_dependent_grad_outputs(job):
    """Backward of sum_r (r + 1) L_r: the other blocks' terms must use their owner's weight."""
    world, results = job
    sizes = sizes_for("uneven", world)
    leaves = [x.clone().requires_grad_() for x in full_views(sizes)]
    losses = per_rank_losses(*leaves, sizes)
    sum((r + 1.0) * loss for r, loss in enumerate(losses)).backward()
    for rank, res in enumerate(results):
        close(res["weighted"]["loss"], losses[rank].detach(), f"rank{rank} loss")
        for i in range(2):
            close(res["weighted"]["grads"][i], leaves[i].grad[rows(sizes, rank)], f"rank{rank} grad{i}")


def test_ring_bf16_close_to_float64(job):
    world, results = job
    sizes = sizes_for("uneven", world)
    ref = run(naive(), *full_views(sizes))
    loss = torch.stack([r["bf16"]["loss"] for r in results]).mean()
    assert loss.dtype == torch.float32
    close(loss.double(), ref["loss"], rtol=5e-3, atol=5e-3)
    for i in range(2):
        grad = torch.cat([r["bf16"]["grads"][i].double() for r in results]) / world
        assert (grad - ref["grads"][i]).abs().max() / ref["grads"][i].abs().max() < 3e-2
