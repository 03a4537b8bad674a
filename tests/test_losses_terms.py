"""DCL, HN-NCE, uniformity and alignment (single process): float64 parity with the naive
references in ``clip_train.losses.reference_terms`` (forward, both feature gradients and
the scale gradient), degenerate cases (HN-NCE -> InfoNCE / DCL, the DCL-InfoNCE gap), bf16,
and the dispatch-mode proof that the tiled terms never build a B x B tensor."""
import math

import pytest
import torch
from loss_helpers import OpRecorder

from clip_train.losses import (
    alignment_loss,
    decoupled_contrastive_loss,
    hard_negative_contrastive_loss,
    naive_alignment_loss,
    naive_decoupled_contrastive_loss,
    naive_hard_negative_contrastive_loss,
    naive_softmax_contrastive_loss,
    naive_uniformity_loss,
    softmax_contrastive_loss,
    uniformity_loss,
    uniformity_terms,
)

HN = dict(beta_image=0.3, beta_text=0.7, alpha=0.6)
HN_NEG = dict(beta_image=-0.4, beta_text=1.2, alpha=2.0)
UNION_W = 0.5


def naive_uniformity_terms(a, b, s, t=2.0):
    u = lambda x: naive_uniformity_loss(x, t)[0]  # noqa: E731
    return (u(a) + u(b)) / 2 + UNION_W * u(torch.cat([a, b])), {}


def ours(term, tile):
    """Every term as ``f(a, b, s) -> (loss, metrics)`` (unused inputs get zero gradients)."""
    return {
        "dcl": lambda a, b, s: decoupled_contrastive_loss(a, b, s, tile_size=tile),
        "hn": lambda a, b, s: hard_negative_contrastive_loss(a, b, s, **HN, tile_size=tile),
        "hn_default": lambda a, b, s: hard_negative_contrastive_loss(a, b, s, tile_size=tile),
        "hn_neg_beta": lambda a, b, s: hard_negative_contrastive_loss(a, b, s, **HN_NEG, tile_size=tile),
        "uniformity": lambda a, b, s: uniformity_loss(a, t=2.0, tile_size=tile),
        "uniformity_terms": lambda a, b, s: uniformity_terms(a, b, t=2.0, tile_size=tile, union_weight=UNION_W),
        "alignment": lambda a, b, s: alignment_loss(a, b, alpha=2.0),
        "alignment_1.5": lambda a, b, s: alignment_loss(a, b, alpha=1.5),
    }[term]


NAIVE = {
    "dcl": naive_decoupled_contrastive_loss,
    "hn": lambda a, b, s: naive_hard_negative_contrastive_loss(a, b, s, **HN),
    "hn_default": naive_hard_negative_contrastive_loss,
    "hn_neg_beta": lambda a, b, s: naive_hard_negative_contrastive_loss(a, b, s, **HN_NEG),
    "uniformity": lambda a, b, s: naive_uniformity_loss(a, 2.0),
    "uniformity_terms": naive_uniformity_terms,
    "alignment": lambda a, b, s: naive_alignment_loss(a, b, 2.0),
    "alignment_1.5": lambda a, b, s: naive_alignment_loss(a, b, 1.5),
}
TERMS = list(NAIVE)
TILED = ["dcl", "hn", "uniformity"]
CONTRASTIVE = ["dcl", "hn", "hn_default", "hn_neg_beta"]
# (batch, tile): batches that do not divide the tile, tile > batch, tile 1, tile == batch.
CASES = [(37, 8), (5, 16), (2, 1), (24, 24)]
TOL = dict(rtol=1e-10, atol=1e-12)


def make_inputs(n, d=8, dtype=torch.float64, seed=0, normalise=True, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    if normalise:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return [a.to(dtype), b.to(dtype), torch.tensor(scale, dtype=torch.float64)]


def loss_and_grads(fn, inputs, grad_out=1.0):
    leaves = [x.clone().requires_grad_() for x in inputs]
    loss, metrics = fn(*leaves)
    (loss * grad_out).backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return loss.detach(), grads, metrics


def assert_all_close(xs, ys, **tol):
    for i, (u, v) in enumerate(zip(xs, ys)):
        torch.testing.assert_close(u, v, msg=lambda m: f"item {i}: {m}", **tol)


@pytest.mark.parametrize("n,tile", CASES)
@pytest.mark.parametrize("term", TERMS)
def test_float64_parity_with_naive(term, n, tile):
    inputs = make_inputs(n, seed=n)
    loss, grads, metrics = loss_and_grads(ours(term, tile), inputs)
    ref_loss, ref_grads, ref_metrics = loss_and_grads(NAIVE[term], inputs)
    assert_all_close([loss] + grads, [ref_loss] + ref_grads, **TOL)
    torch.testing.assert_close(metrics["loss"], ref_loss, **TOL)
    assert all(not v.requires_grad for v in metrics.values())
    if term in CONTRASTIVE:
        for key in ("pos_logit_mean", "neg_logit_mean"):
            torch.testing.assert_close(metrics[key], ref_metrics[key], **TOL)


@pytest.mark.parametrize("term", TERMS)
def test_gradcheck_unnormalised_features(term):
    """Exact gradients for arbitrary (not unit-norm) features, scale and grad_output."""
    a, b, s = [x.requires_grad_() for x in make_inputs(6, d=3, normalise=False, scale=1.5)]
    fn = ours(term, 4)
    assert torch.autograd.gradcheck(lambda *x: fn(*x)[0], (a, b, s))


@pytest.mark.parametrize("term", TERMS)
def test_grad_output_scaling_unnormalised(term):
    inputs = make_inputs(11, normalise=False, scale=1.5)
    loss, grads, _ = loss_and_grads(ours(term, 4), inputs, grad_out=-2.5)
    ref_loss, ref_grads, _ = loss_and_grads(NAIVE[term], inputs, grad_out=-2.5)
    assert_all_close([loss] + grads, [ref_loss] + ref_grads, **TOL)


@pytest.mark.parametrize("n,tile", [(37, 8), (5, 16), (1, 16)])
def test_hn_nce_beta0_alpha1_is_infonce(n, tile):
    inputs = make_inputs(n, seed=3)
    hn = lambda a, b, s: hard_negative_contrastive_loss(  # noqa: E731
        a, b, s, beta_image=0.0, beta_text=0.0, alpha=1.0, tile_size=tile)
    got = loss_and_grads(hn, inputs)
    want = loss_and_grads(lambda a, b, s: softmax_contrastive_loss(a, b, s, tile_size=tile), inputs)
    assert_all_close([got[0]] + got[1], [want[0]] + want[1], rtol=0, atol=1e-12)


def test_hn_nce_alpha0_beta0_is_dcl():
    inputs = make_inputs(37, seed=4)
    hn = lambda a, b, s: hard_negative_contrastive_loss(  # noqa: E731
        a, b, s, beta_image=0.0, beta_text=0.0, alpha=0.0, tile_size=8)
    got = loss_and_grads(hn, inputs)
    want = loss_and_grads(naive_decoupled_contrastive_loss, inputs)
    assert_all_close([got[0]] + got[1], [want[0]] + want[1], **TOL)


def test_dcl_differs_from_infonce_by_the_positive_term():
    """``L_InfoNCE - L_DCL = 1/2 [mean_i (lse_j S_ij - lse_{j!=i} S_ij) + columns]``."""
    a, b, s = make_inputs(37, seed=5)
    info, _ = softmax_contrastive_loss(a, b, s, tile_size=8)
    dcl, _ = decoupled_contrastive_loss(a, b, s, tile_size=8)
    S = s * a @ b.T
    off = S.masked_fill(torch.eye(37, dtype=torch.bool), float("-inf"))
    gap = ((S.logsumexp(1) - off.logsumexp(1)).mean() + (S.logsumexp(0) - off.logsumexp(0)).mean()) / 2
    torch.testing.assert_close(info - dcl, gap, **TOL)
    assert gap > 0


def test_hn_nce_single_row_is_log_alpha():
    """A global batch of 1 has no negatives: each row's loss is ``log alpha``, no gradient."""
    inputs = make_inputs(1)
    loss, grads, _ = loss_and_grads(
        lambda a, b, s: hard_negative_contrastive_loss(a, b, s, alpha=0.25, tile_size=4), inputs)
    torch.testing.assert_close(loss, torch.tensor(math.log(0.25), dtype=torch.float64))
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda a, b, s: decoupled_contrastive_loss(a[:1], b[:1], s), "at least 2"),
        (lambda a, b, s: hard_negative_contrastive_loss(a[:1], b[:1], s, alpha=0.0), "at least 2"),
        (lambda a, b, s: hard_negative_contrastive_loss(a, b, s, alpha=-1.0), "alpha"),
        (lambda a, b, s: decoupled_contrastive_loss(a, b[:3], s), "features"),
        (lambda a, b, s: uniformity_loss(a[:1]), "at least 2"),
        (lambda a, b, s: uniformity_loss(a, tile_size=0), "tile_size"),
        (lambda a, b, s: alignment_loss(a, b[:3]), "features"),
        (lambda a, b, s: alignment_loss(a, b, alpha=0.0), "alpha"),
    ],
)
def test_bad_inputs_raise_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call(*make_inputs(4))


def test_uniformity_terms_metrics_and_default_union_weight():
    a, b, _ = make_inputs(13, seed=6)
    loss, metrics = uniformity_terms(a, b, t=2.0, tile_size=4)
    u = lambda x: naive_uniformity_loss(x, 2.0)[0]  # noqa: E731
    torch.testing.assert_close(metrics["uniformity_image"], u(a), **TOL)
    torch.testing.assert_close(metrics["uniformity_text"], u(b), **TOL)
    torch.testing.assert_close(metrics["uniformity_union"], u(torch.cat([a, b])), **TOL)
    torch.testing.assert_close(loss, (u(a) + u(b)) / 2, **TOL)
    assert set(metrics) == {"loss", "uniformity_image", "uniformity_text", "uniformity_union"}


@pytest.mark.parametrize("term", ["dcl", "hn", "uniformity", "alignment"])
def test_bf16_close_to_float64_with_float32_stats(term):
    n, tile = 40, 16
    inputs = make_inputs(n, dtype=torch.bfloat16)
    with OpRecorder() as rec:
        loss, grads, _ = loss_and_grads(ours(term, tile), inputs)
    exact = [x.to(torch.float64) for x in inputs]
    ref_loss, ref_grads, _ = loss_and_grads(NAIVE[term], exact)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads[:2]] == [torch.bfloat16] * 2
    for op in ("logaddexp", "logsumexp", "exp_", "sigmoid", "vdot"):
        if op in rec.dtypes:
            assert rec.dtypes[op] == {torch.float32}, (op, rec.dtypes[op])
    torch.testing.assert_close(loss.double(), ref_loss, rtol=5e-3, atol=5e-3)
    for g, r in zip(grads, ref_grads):
        if r.abs().max() > 0:
            err = (g.double() - r).abs().max() / r.abs().max()
            assert err < 3e-2, err


@pytest.mark.parametrize("term", TILED)
def test_never_allocates_full_matrix(term):
    n, tile, d = 256, 32, 8
    inputs = make_inputs(n, d=d, dtype=torch.float32)
    with OpRecorder() as ours_rec:
        loss_and_grads(ours(term, tile), inputs)
    with OpRecorder() as naive_rec:
        loss_and_grads(NAIVE[term], inputs)
    assert ours_rec.max_numel < n * n, ours_rec.max_numel
    assert ours_rec.max_numel <= max(tile * tile, n * (d + 1)), ours_rec.max_numel
    assert naive_rec.max_numel >= n * n
