"""Single-process tiled losses: float64 parity (naive reference and open_clip), bf16,
custom grad_output, validation, and a dispatch-mode proof that no B x B tensor exists."""
import pytest
import torch
from loss_helpers import OpRecorder, open_clip_loss_module

from clip_train.losses import (
    naive_sigmoid_contrastive_loss,
    naive_softmax_contrastive_loss,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)

# (batch, tile): batches that do not divide the tile, a single row, tile > batch, tile == batch.
CASES = [(37, 8), (5, 16), (1, 16), (1, 1), (24, 24), (70, 7)]


OCL = open_clip_loss_module()


def make_inputs(n, d=16, dtype=torch.float64, seed=0, normalise=True):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    if normalise:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    s, t = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    return [x.to(dtype) for x in (a, b)] + [s, t]


def loss_and_grads(fn, inputs, n_scalars, grad_out=1.0):
    leaves = [x.clone().requires_grad_() for x in inputs[: 2 + n_scalars]]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * grad_out).backward()
    return loss.detach(), [x.grad for x in leaves], out[1] if isinstance(out, tuple) else None


def ours(kind, tile):
    if kind == "softmax":
        return lambda a, b, s: softmax_contrastive_loss(a, b, s, tile_size=tile)
    return lambda a, b, s, t: sigmoid_contrastive_loss(a, b, s, t, tile_size=tile)


NAIVE = {"softmax": naive_softmax_contrastive_loss, "sigmoid": naive_sigmoid_contrastive_loss}
N_SCALARS = {"softmax": 1, "sigmoid": 2}


def assert_all_close(x, y, **tol):
    for u, v in zip(x, y):
        torch.testing.assert_close(u, v, **tol)


@pytest.mark.parametrize("n,tile", CASES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_float64_parity_with_naive_and_open_clip(kind, n, tile):
    inputs = make_inputs(n)
    k = N_SCALARS[kind]
    loss, grads, metrics = loss_and_grads(ours(kind, tile), inputs, k)
    ref_loss, ref_grads, ref_metrics = loss_and_grads(NAIVE[kind], inputs, k)
    oc = OCL.ClipLoss() if kind == "softmax" else OCL.SigLipLoss()
    oc_loss, oc_grads, _ = loss_and_grads(oc, inputs, k)
    tol = dict(rtol=1e-10, atol=1e-12)
    assert_all_close([loss] + grads, [ref_loss] + ref_grads, **tol)
    assert_all_close([loss] + grads, [oc_loss] + oc_grads, **tol)
    for key in ("loss", "pos_logit_mean", "neg_logit_mean"):
        torch.testing.assert_close(metrics[key], ref_metrics[key], **tol)
        assert not metrics[key].requires_grad


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_gradcheck_unnormalised_features(kind):
    """Gradients are exact for arbitrary (not L2-normalised) features and any grad_output."""
    a, b, s, t = [x.requires_grad_() for x in make_inputs(6, d=3, normalise=False)]
    fn = ours(kind, 4)
    args = (a, b, s) if kind == "softmax" else (a, b, s, t)
    assert torch.autograd.gradcheck(lambda *x: fn(*x)[0], args)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_grad_output_scaling(kind):
    inputs = make_inputs(11, normalise=False)
    k = N_SCALARS[kind]
    _, grads, _ = loss_and_grads(ours(kind, 4), inputs, k, grad_out=-2.5)
    _, ref_grads, _ = loss_and_grads(NAIVE[kind], inputs, k, grad_out=-2.5)
    assert_all_close(grads, ref_grads, rtol=1e-10, atol=1e-12)


def record(fn, inputs, n_scalars):
    with OpRecorder() as rec:
        loss_and_grads(fn, inputs, n_scalars)
    return rec


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_never_allocates_full_matrix(kind):
    n, tile, d = 256, 32, 8
    inputs = make_inputs(n, d=d, dtype=torch.float32)
    k = N_SCALARS[kind]
    ours_rec = record(ours(kind, tile), inputs, k)
    naive_rec = record(NAIVE[kind], inputs, k)
    # Largest tensor: a gradient accumulator (n x (D+1)) or a tile, never n x n.
    assert ours_rec.max_numel <= max(tile * tile, n * (d + 1)), ours_rec.max_numel
    assert naive_rec.max_numel >= n * n  # the recorder does see a full matrix when there is one


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bf16_close_to_float64_with_float32_stats(kind):
    n, tile = 70, 16
    inputs = make_inputs(n, dtype=torch.bfloat16)
    k = N_SCALARS[kind]
    with OpRecorder() as rec:
        loss, grads, metrics = loss_and_grads(ours(kind, tile), inputs, k)
    exact = [x.to(torch.float64) for x in inputs]
    ref_loss, ref_grads, _ = loss_and_grads(NAIVE[kind], exact, k)
    assert loss.dtype == torch.float32 and metrics["loss"].dtype == torch.float32
    assert [g.dtype for g in grads[:2]] == [torch.bfloat16] * 2
    # Statistics and per-tile reductions are float32, never bf16.
    for op in ("logaddexp", "logsumexp", "softplus", "exp_", "sigmoid_", "sum", "vdot"):
        if op in rec.dtypes:
            assert rec.dtypes[op] == {torch.float32}, (op, rec.dtypes[op])
    torch.testing.assert_close(loss.double(), ref_loss, rtol=5e-3, atol=5e-3)
    for g, r in zip(grads, ref_grads):
        err = (g.double() - r).abs().max() / r.abs().max()
        assert err < 3e-2, err


def test_tile_larger_than_batch_equals_one_tile():
    inputs = make_inputs(20)
    a = loss_and_grads(ours("softmax", 20), inputs, 1)
    b = loss_and_grads(ours("softmax", 4096), inputs, 1)
    assert_all_close([a[0]] + a[1], [b[0]] + b[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(a=(4, 8), b=(5, 8)), "features"),
        (dict(a=(4, 8), b=(4, 8), tile_size=0), "tile_size"),
        (dict(a=(0, 8), b=(0, 8)), "at least one row"),
        (dict(a=(4, 8), b=(4, 8), scale=(2,)), "scalars"),
    ],
)
def test_bad_inputs_raise_clearly(args, match):
    a, b = torch.randn(args["a"]), torch.randn(args["b"])
    scale = torch.ones(args.get("scale", ()))
    with pytest.raises(ValueError, match=match):
        softmax_contrastive_loss(a, b, scale, tile_size=args.get("tile_size", 4))
    with pytest.raises(ValueError, match=match):
        sigmoid_contrastive_loss(a, b, scale, torch.zeros(()), tile_size=args.get("tile_size", 4))
