"""CoCa captioning loss: parity with open_clip's ``CoCaLoss`` caption term (also on a tiny
open_clip CoCa model's forward output), padding ignored, bf16, and the distributed token
mean over 2 gloo ranks with uneven token counts (one spawned job, results via files)."""
import pytest
import torch
from dist_harness import run_workers
from loss_helpers import open_clip_loss_module

from clip_train.losses import caption_loss, naive_caption_loss

V = 11
PAD = 0


def make_batch(b, t, seed=0, dtype=torch.float64, lengths=None):
    """Random logits and labels; row r has ``lengths[r]`` real tokens then padding
    (default: 1 to t-1 tokens, so every row has padding)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(1, V, (b, t), generator=g)
    lengths = lengths if lengths is not None else torch.randint(1, t, (b,), generator=g).tolist()
    for r, n in enumerate(lengths):
        labels[r, n:] = PAD
    return logits, labels


def run(fn, logits, labels, grad_out=1.0):
    x = logits.clone().requires_grad_()
    out = fn(x, labels)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * grad_out).backward()
    return loss.detach(), x.grad


def open_clip_caption(logits, labels):
    fn = open_clip_loss_module().CoCaLoss(caption_loss_weight=1, clip_loss_weight=0, pad_id=PAD)
    return fn(None, None, logits, labels, None)[1]


def close(x, y, msg="", rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=msg)


@pytest.mark.parametrize("b,t,seed", [(4, 7, 0), (1, 5, 1), (9, 3, 2)])
def test_parity_with_open_clip_coca_loss(b, t, seed):
    logits, labels = make_batch(b, t, seed)
    assert (labels == PAD).any()
    ours, ours_g = run(lambda x, y: caption_loss(x, y, pad_id=PAD), logits, labels)
    ref, ref_g = run(open_clip_caption, logits, labels)
    naive, naive_g = run(naive_caption_loss, logits, labels)
    close(ours, ref)
    close(ours_g, ref_g)
    close(ours, naive)
    close(ours_g, naive_g)
    _, metrics = caption_loss(logits, labels)
    assert metrics["caption_tokens"].item() == (labels != PAD).sum().item()
    assert not metrics["loss"].requires_grad


def test_other_pad_id():
    logits, labels = make_batch(5, 6, seed=3)
    labels[labels == 3] = 7  # make 7 frequent, then treat it as padding
    ours, ours_g = run(lambda x, y: caption_loss(x, y, pad_id=7), logits, labels)
    ref_fn = open_clip_loss_module().CoCaLoss(caption_loss_weight=1, clip_loss_weight=0, pad_id=7)
    ref, ref_g = run(lambda x, y: ref_fn(None, None, x, y, None)[1], logits, labels)
    close(ours, ref)
    close(ours_g, ref_g)


def test_padding_is_ignored():
    logits, labels = make_batch(6, 8, seed=4)
    pad = labels == PAD
    assert pad.any() and (~pad).any()
    changed = logits.clone()
    changed[pad] = 100.0 * torch.randn(int(pad.sum()), V, dtype=torch.float64)
    loss, grad = run(caption_loss, logits, labels)
    loss2, grad2 = run(caption_loss, changed, labels)
    close(loss, loss2)
    assert grad[pad].abs().max() == 0 and grad2[pad].abs().max() == 0
    close(grad[~pad], grad2[~pad])


def test_all_padding_gives_zero_not_nan():
    logits, labels = make_batch(2, 3, lengths=[0, 0])
    loss, grad = run(caption_loss, logits, labels)
    assert loss.item() == 0.0 and grad.abs().max() == 0


def test_bf16_logits():
    logits, labels = make_batch(8, 10, seed=5)
    loss, grad = run(caption_loss, logits.bfloat16(), labels)
    ref, ref_g = run(naive_caption_loss, logits, labels)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    close(loss.double(), ref, rtol=1e-2, atol=1e-2)
    assert (grad.double() - ref_g).abs().max() / ref_g.abs().max() < 3e-2


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="logits must be"):
        caption_loss(torch.randn(2, 3, V), torch.zeros(2, 4, dtype=torch.long))


def test_open_clip_coca_forward_output():
    """A tiny open_clip CoCa: ``out["logits"]`` (B, T-1, V) predict ``out["labels"]`` =
    ``text[:, 1:]``; our loss on them equals ``CoCaLoss``'s caption term."""
    from open_clip.coca_model import CoCa

    torch.manual_seed(0)
    model = CoCa(
        embed_dim=32,
        multimodal_cfg=dict(context_length=8, width=32, heads=2, layers=1, vocab_size=50),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1, embed_cls=True, output_tokens=True),
        vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16, attentional_pool=True,
                        attn_pooler_heads=2, output_tokens=True),
    )
    torch.nn.init.normal_(model.text_decoder.text_projection, std=32 ** -0.5)  # left uninitialised
    text = torch.randint(1, 50, (3, 8))
    text[0, 5:], text[2, 3:] = PAD, PAD
    out = model(torch.randn(3, 3, 16, 16), text)
    assert out["logits"].shape == (3, 7, 50) and torch.equal(out["labels"], text[:, 1:])
    ours, _ = caption_loss(out["logits"], out["labels"], pad_id=PAD)
    assert torch.isfinite(ours)
    close(ours, open_clip_caption(out["logits"], out["labels"]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- distributed

# Rank 0: 3 captions, rank 1: 5 captions, with different lengths (uneven token counts).
LENGTHS = [[6, 1, 4], [2, 2, 7, 3, 5]]
EVEN_LENGTHS = [[6, 6], [1, 2]]  # same rows per rank, very different token counts
T = 7


def full_batch(lengths):
    flat = [n for per_rank in lengths for n in per_rank]
    return make_batch(len(flat), T, seed=len(flat), lengths=flat)


def rows(lengths, rank):
    start = sum(len(x) for x in lengths[:rank])
    return slice(start, start + len(lengths[rank]))


def child_scenarios(rank, world):
    out = {}
    for name, lengths in (("uneven", LENGTHS), ("even_rows", EVEN_LENGTHS)):
        logits, labels = full_batch(lengths)
        sl = rows(lengths, rank)
        loss, grad = run(caption_loss, logits[sl], labels[sl])
        out[name] = {"loss": loss, "grad": grad, "tokens": caption_loss(logits[sl], labels[sl])[1]["caption_tokens"]}
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return run_workers(child_scenarios, 2, tmp_path_factory.mktemp("caption_world2"))


@pytest.mark.parametrize("name", ["uneven", "even_rows"])
def test_distributed_token_mean(job, name):
    """mean_r L_r == full-batch token mean; each rank's grads == W x single-process grads."""
    lengths = LENGTHS if name == "uneven" else EVEN_LENGTHS
    logits, labels = full_batch(lengths)
    ref, ref_g = run(caption_loss, logits, labels)
    close(torch.stack([r[name]["loss"] for r in job]).mean(), ref, f"{name} loss")
    for rank, res in enumerate(job):
        close(res[name]["grad"], 2 * ref_g[rows(lengths, rank)], f"{name} rank{rank} grad")
        assert res[name]["tokens"].item() == sum(lengths[rank])
    # The plain local mean would be wrong here (token counts differ between ranks).
    local_means = [naive_caption_loss(logits[rows(lengths, r)], labels[rows(lengths, r)]) for r in range(2)]
    assert abs(torch.stack(local_means).mean() - ref) > 1e-3
