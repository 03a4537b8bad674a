"""GradCache: the micro-batched gradient equals the full-batch gradient (float64).

With dropout active, a single forward over the full batch draws different masks than k
micro-batch forwards, so the dropout tests compare against *plain autograd over the same
micro-batch forwards* (same seed, same order, all kept in one graph, one ``loss.backward()``
on the loss over the concatenation): the full-batch gradient for those masks.  Without
dropout the reference is literally ``loss_fn(*model(full_batch)).backward()``.
"""
import contextlib
import copy
import functools

import pytest
import torch
from dist_harness import run_workers

from clip_train.engine import gradcache
from clip_train.engine.gradcache import gradcache_backward, split_batch
from clip_train.losses import sigmoid_contrastive_loss, softmax_contrastive_loss

BATCH = 8
TILE = 3  # divides no micro-batch size: the tiled loss paths are exercised too
SEED = 1234
LOSSES = {
    "softmax": functools.partial(softmax_contrastive_loss, tile_size=TILE),
    "sigmoid": functools.partial(sigmoid_contrastive_loss, tile_size=TILE),
}


class TextFeatureDropout(torch.nn.Module):
    """A CLIP whose text features go through ``nn.Dropout`` (the image tower has
    patch-dropout), so both towers draw random numbers in training mode."""

    def __init__(self, clip, p):
        super().__init__()
        self.clip = clip
        self.dropout = torch.nn.Dropout(p)

    def forward(self, image, text):
        image_features, text_features, *scalars = self.clip(image, text)
        return (image_features, self.dropout(text_features), *scalars)

    @property
    def logit_scale(self):
        return self.clip.logit_scale


def make_model(kind, dropout):
    """Tiny float64 open_clip CLIP in training mode, same weights for the same arguments."""
    import open_clip  # imported here: the spawned workers should pay for it only once

    torch.manual_seed(0)
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 16, "patch_size": 4, "width": 32, "layers": 1, "head_width": 16,
                    "patch_dropout": 0.5 if dropout else 0.0},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
        init_logit_bias=-2.0 if kind == "sigmoid" else None,
    )
    return TextFeatureDropout(clip, 0.3 if dropout else 0.0).double().train()


def make_batch(n=BATCH, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
            "text": torch.randint(1, 100, (n, 8), generator=g), "skipped": 3}


def model_forward(model):
    return lambda mb: model(mb["image"], mb["text"])


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def run_gradcache(model, kind, micro_batches, seed=SEED, **kw):
    torch.manual_seed(seed)
    loss, metrics = gradcache_backward(model_forward(model), LOSSES[kind], micro_batches, **kw)
    return loss, grads(model)


def run_reference(model, kind, micro_batches, seed=SEED):
    """Plain autograd over the same micro-batch forwards, one graph, one backward."""
    torch.manual_seed(seed)
    outputs = [model(mb["image"], mb["text"]) for mb in micro_batches]
    image = torch.cat([o[0] for o in outputs])
    text = torch.cat([o[1] for o in outputs])
    loss, _ = LOSSES[kind](image, text, *outputs[0][2:])
    loss.backward()
    return loss.detach(), grads(model)


def run_full_batch(model, kind, batch):
    loss, _ = LOSSES[kind](*model(batch["image"], batch["text"]))
    loss.backward()
    return loss.detach(), grads(model)


def assert_grads_close(got, want, msg=""):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=f"{msg} {name}")


def scalar_names(kind):
    return ["clip.logit_scale"] + (["clip.logit_bias"] if kind == "sigmoid" else [])


# --- single process -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_matches_full_batch_without_dropout(kind, k):
    batch = make_batch()
    loss, got = run_gradcache(make_model(kind, dropout=False), kind, split_batch(batch, k))
    ref_loss, want = run_full_batch(make_model(kind, dropout=False), kind, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_grads_close(got, want, f"k={k}")
    for name in scalar_names(kind):
        assert want[name].abs().item() > 1e-6, f"{name} gradient is trivially zero: weak test"


def with_vector_logit_params(model):
    """Logit scale/bias of shape [1], as the trainer builds them for DeepSpeed."""
    for name in ("logit_scale", "logit_bias"):
        setattr(model.clip, name, torch.nn.Parameter(getattr(model.clip, name).detach().reshape(1)))
    return model


def test_matches_full_batch_with_shape_1_logit_params():
    kind, batch = "sigmoid", make_batch()
    loss, got = run_gradcache(with_vector_logit_params(make_model(kind, False)), kind, split_batch(batch, 2))
    ref_loss, want = run_full_batch(with_vector_logit_params(make_model(kind, False)), kind, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_grads_close(got, want)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [2, 4])
def test_matches_full_batch_with_dropout_replayed(kind, k):
    micro_batches = split_batch(make_batch(), k)
    model = make_model(kind, dropout=True)
    modes = []
    forward = model_forward(model)
    torch.manual_seed(SEED)
    loss, _ = gradcache_backward(lambda mb: modes.append(model.training) or forward(mb),
                                 LOSSES[kind], micro_batches)
    ref_loss, want = run_reference(make_model(kind, dropout=True), kind, micro_batches)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads(model), want, f"k={k}")
    assert modes == [True] * (2 * k), "encode and replay must both run in training mode"


def test_without_rng_replay_gradients_differ(monkeypatch):
    """Negative control: the dropout test above can fail."""
    kind, micro_batches = "softmax", split_batch(make_batch(), 2)
    _, want = run_reference(make_model(kind, dropout=True), kind, micro_batches)
    monkeypatch.setattr(gradcache, "restore_rng_state", lambda state: None)
    _, got = run_gradcache(make_model(kind, dropout=True), kind, micro_batches)
    worst = max((got[n] - want[n]).abs().max().item() for n in want)
    assert worst > 1e-4, f"gradients agree without RNG replay (max diff {worst}): dropout has no effect"


def test_rng_state_after_call_is_after_last_forward():
    """The RNG ends where one plain pass over the micro-batches would leave it."""
    kind, micro_batches = "sigmoid", split_batch(make_batch(), 4)
    model = make_model(kind, dropout=True)
    torch.manual_seed(SEED)
    with torch.no_grad():
        for mb in micro_batches:
            model(mb["image"], mb["text"])
    expected = torch.rand(4)
    run_gradcache(model, kind, micro_batches)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_one_adamw_step_equals_full_batch_step(kind):
    """Parameters after one AdamW step agree to 1e-11 (a step moves them by ~lr = 1e-2).
    eps is raised to 1e-6 because the attention key bias has an exactly-zero true gradient
    (softmax is shift invariant): both runs hold rounding noise (~1e-17) there, and Adam's
    first step ``lr g / (|g| + eps)`` amplifies it by ``lr / eps``."""
    batch = make_batch()
    model, ref_model = make_model(kind, dropout=False), make_model(kind, dropout=False)
    for m, step in ((model, lambda: run_gradcache(model, kind, split_batch(batch, 4))),
                    (ref_model, lambda: run_full_batch(ref_model, kind, batch))):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
        step()
        optimizer.step()
    initial = make_model(kind, dropout=False).state_dict()
    for name, value in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=1e-11, msg=name)
    assert any(not torch.equal(initial[n], v) for n, v in ref_model.state_dict().items())


def test_backward_callback_sees_each_micro_batch_once_with_last_flag():
    kind, micro_batches = "softmax", split_batch(make_batch(), 4)
    model = make_model(kind, dropout=False)
    flags, contexts = [], []

    def backward(surrogate, is_last):
        flags.append(is_last)
        surrogate.backward()

    @contextlib.contextmanager
    def replay_context(is_last):
        contexts.append(is_last)
        yield

    gradcache_backward(model_forward(model), LOSSES[kind], micro_batches, backward, replay_context)
    assert flags == contexts == [False, False, False, True]


def test_differing_scalars_between_micro_batches_are_refused():
    model = make_model("softmax", dropout=False)
    calls = []

    def forward(mb):
        calls.append(1)
        image, text, scale = model(mb["image"], mb["text"])
        return image, text, scale * len(calls)

    with pytest.raises(ValueError, match="differ between micro-batches"):
        gradcache_backward(forward, LOSSES["softmax"], split_batch(make_batch(), 2))


# --- split_batch ----------------------------------------------------------------------------


def test_split_batch_splits_tensors_and_lists_and_keeps_counters_once():
    batch = {"image": torch.arange(12).reshape(6, 2), "text": torch.arange(6),
             "keys": list("abcdef"), "skipped": 5, "dropped": torch.tensor(2)}
    parts = split_batch(batch, 3)
    assert len(parts) == 3
    assert [p["text"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.cat([p["image"] for p in parts]), batch["image"])
    assert [p["keys"] for p in parts] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [p["skipped"] for p in parts] == [5, 0, 0]
    assert [int(p["dropped"]) for p in parts] == [2, 0, 0]
    assert split_batch(batch, 1)[0]["skipped"] == 5


@pytest.mark.parametrize("batch, k, error, match", [
    ({"image": torch.zeros(6, 2)}, 4, ValueError, "batch size 6 is not divisible by 4"),
    ({"image": torch.zeros(6, 2)}, 0, ValueError, "positive integer"),
    ({"image": torch.zeros(6, 2), "text": torch.zeros(5)}, 1, ValueError, "disagree on the batch size"),
    ({"skipped": 1}, 1, ValueError, "no per-sample entries"),
    ({"image": torch.zeros(6, 2), "meta": {"a": 1}}, 2, TypeError, "'meta'"),
])
def test_split_batch_errors(batch, k, error, match):
    with pytest.raises(error, match=match):
        split_batch(batch, k)


def test_gradcache_needs_a_micro_batch():
    with pytest.raises(ValueError, match="at least one micro-batch"):
        gradcache_backward(lambda mb: mb, LOSSES["softmax"], [])


# --- DDP over 2 gloo processes ----------------------------------------------------------------

WORLD = 2
K_PER_RANK = 2


def rank_rows(rank):
    per_rank = BATCH // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


def rank_micro_batches(rank):
    batch = make_batch()
    local = {key: value[rank_rows(rank)] if key != "skipped" else value for key, value in batch.items()}
    return split_batch(local, K_PER_RANK)


def ddp_gradcache(ddp, kind, rank, use_no_sync):
    """One GradCache step on this rank; returns (loss, grads, all-reduced bucket indices)."""
    reduced = ddp.reduced_buckets
    reduced.clear()
    ddp.zero_grad(set_to_none=True)
    context = (lambda last: contextlib.nullcontext() if last else ddp.no_sync()) if use_no_sync else None
    torch.manual_seed(SEED + rank)
    loss, _ = gradcache_backward(model_forward(ddp), LOSSES[kind], rank_micro_batches(rank),
                                 replay_context=context)
    named = {name.removeprefix("module."): p.grad.clone() for name, p in ddp.named_parameters()}
    return {"loss": loss, "grads": named, "buckets": list(reduced)}


def counting_allreduce(state, bucket):
    """DDP's default all-reduce, recording which bucket was reduced."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)


def child_results(rank):
    out = {}
    for kind in ("softmax", "sigmoid"):
        ddp = torch.nn.parallel.DistributedDataParallel(make_model(kind, dropout=True),
                                                        find_unused_parameters=False)
        ddp.reduced_buckets = []
        ddp.register_comm_hook(ddp.reduced_buckets, counting_allreduce)
        out[kind] = ddp_gradcache(ddp, kind, rank, use_no_sync=True)
        # A second step: the reducer finished the first one cleanly and results repeat.
        out[kind + "_again"] = ddp_gradcache(ddp, kind, rank, use_no_sync=True)
        out[kind + "_sync_every_replay"] = ddp_gradcache(ddp, kind, rank, use_no_sync=False)
    return out


def single_thread_child_results(rank, world):
    torch.set_num_threads(1)
    return child_results(rank)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_workers(single_thread_child_results, WORLD, tmp_path_factory.mktemp("gradcache_ddp"))


def single_process_reference(kind):
    """The global batch as the ranks saw it: rank r's micro-batches under seed SEED + r,
    every forward in one graph, the loss over the concatenation in rank order."""
    model = make_model(kind, dropout=True)
    outputs = []
    for rank in range(WORLD):
        torch.manual_seed(SEED + rank)
        outputs += [model(mb["image"], mb["text"]) for mb in rank_micro_batches(rank)]
    image, text = torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
    loss, _ = LOSSES[kind](image, text, *outputs[0][2:])
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ddp_gradcache_matches_single_process_full_batch(ddp_results, kind):
    ref_loss, want = single_process_reference(kind)
    for variant in (kind, kind + "_again", kind + "_sync_every_replay"):
        per_rank = [res[variant] for res in ddp_results]
        mean_loss = torch.stack([r["loss"] for r in per_rank]).mean()
        torch.testing.assert_close(mean_loss, ref_loss, rtol=1e-12, atol=1e-12, msg=variant)
        for rank, r in enumerate(per_rank):
            assert_grads_close(r["grads"], want, f"{variant} rank{rank}")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ddp_no_sync_reduces_each_bucket_once(ddp_results, kind):
    for res in ddp_results:
        buckets = res[kind]["buckets"]
        assert buckets and len(buckets) == len(set(buckets)), f"buckets reduced: {buckets}"
        # Control: without no_sync around the replayed forwards every replay all-reduces.
        assert len(res[kind + "_sync_every_replay"]["buckets"]) == K_PER_RANK * len(set(buckets))
