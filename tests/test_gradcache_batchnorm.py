"""GradCache leaves BatchNorm running statistics as ONE update from the whole batch (float64).

Two references, both computed with torch's own ``F.batch_norm`` / a plain forward, never with
``clip_train.engine.batchnorm_stats``:

* the plain full-batch step (``loss_fn(*model(full_batch)).backward()``): exact for a BatchNorm
  fed by the input alone (the ECG stem's, the audio ``spec_norm``), because it sees the same rows;
* "one update over the concatenated inputs": each layer's inputs captured in the micro-batch
  forwards, concatenated, and put through one training-mode ``F.batch_norm``.  This is the
  target for deeper layers, whose inputs GradCache necessarily normalises per micro-batch.
"""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from clip_train.engine.gradcache import gradcache_backward, split_batch
from clip_train.losses import softmax_contrastive_loss
from clip_train.models.dual import SignalTextCLIP

BATCH, K = 8, 4
LOSS = functools.partial(softmax_contrastive_loss, tile_size=3)
TEXT_CFG = {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}
FRONTEND = {"sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 32, "f_min": 50.0, "f_max": 8000.0}
TOWERS = {  # config, one record's shape, the BatchNorm fed by the input only
    "ecg_resnet1d": ({"tower": "ecg_resnet1d", "widths": [8, 16, 16, 32], "blocks": [1, 1, 1, 1],
                      "width": 24, "pool_heads": 4}, (12, 256), "signal.stem.1"),
    "audio_transformer": ({"tower": "audio_transformer", "frontend": FRONTEND, "clip_samples": 4000,
                           "patch_size": [16, 10], "width": 16, "depth": 1, "heads": 2,
                           "spec_norm": "batchnorm"}, (4000,), "signal.spec_norm"),
    "audio_timm": ({"tower": "audio_timm", "model_name": "test_resnet", "frontend": FRONTEND,
                    "clip_samples": 4000, "spec_norm": "batchnorm"}, (4000,), "signal.spec_norm"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


# --- models, batches, buffers -------------------------------------------------------------------


def batchnorms(model):
    """The BatchNorm layers that keep running statistics."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


def make_model(tower, momentum=0.1):
    """Tiny float64 signal-text CLIP in training mode; running buffers start away from (0, 1, 0)
    so a wrong blend of old and new statistics cannot pass."""
    torch.manual_seed(0)
    model = SignalTextCLIP(TOWERS[tower][0], TEXT_CFG, embed_dim=16).double().train()
    g = torch.Generator().manual_seed(1)
    for bn in batchnorms(model).values():
        bn.momentum = momentum
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
        bn.num_batches_tracked.fill_(3)
    return model


def make_batch(tower, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {"signal": torch.randn(BATCH, *TOWERS[tower][1], generator=g, dtype=torch.float64),
            "text": torch.randint(1, 100, (BATCH, 8), generator=g)}


def forward_of(model):
    return lambda mb: model(mb["signal"], mb["text"])


def buffers(model):
    return {n: (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
            for n, bn in batchnorms(model).items()}


def assert_buffers_close(got, want, names=None):
    for name in names or want:
        (mean, var, batches), (want_mean, want_var, want_batches) = got[name], want[name]
        assert batches == want_batches, f"{name}: num_batches_tracked {batches} != {want_batches}"
        torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12, msg=f"{name} running_mean")
        torch.testing.assert_close(var, want_var, rtol=1e-10, atol=1e-12, msg=f"{name} running_var")


def max_diff(got, want):
    return max(max((g[0] - w[0]).abs().max().item(), (g[1] - w[1]).abs().max().item())
               for g, w in ((got[n], want[n]) for n in want))


# --- references -----------------------------------------------------------------------------------


def full_batch_step(model, batch):
    """The plain step GradCache stands in for: one training forward + backward, on a copy."""
    model = copy.deepcopy(model)
    loss, _ = LOSS(*forward_of(model)(batch))
    loss.backward()
    return buffers(model)


def one_update_over_concatenated_inputs(model, micro_batches, forward=None):
    """Capture each BatchNorm's inputs in the micro-batch forwards (of a copy), then one
    ``F.batch_norm`` per call index on the concatenation, from the buffers before the step."""
    model = copy.deepcopy(model)
    expected = buffers(model)
    seen = {n: [] for n in batchnorms(model)}  # per micro-batch, the inputs of each call

    def capture(name):
        return lambda module, args: seen[name][-1].append(args[0].detach().clone()) if module.training else None

    hooks = [bn.register_forward_pre_hook(capture(n)) for n, bn in batchnorms(model).items()]
    with torch.no_grad():
        for mb in micro_batches:
            for calls in seen.values():
                calls.append([])
            (forward or forward_of)(model)(mb)
    for hook in hooks:
        hook.remove()
    for name, bn in batchnorms(model).items():
        mean, var, batches = expected[name]
        for inputs in zip(*seen[name]):  # call j of every micro-batch
            batches += 1
            factor = 1.0 / batches if bn.momentum is None else bn.momentum
            F.batch_norm(torch.cat(inputs), mean, var, training=True, momentum=factor)
        expected[name] = (mean, var, batches)
    return expected


def run_gradcache(model, micro_batches, forward=None, **kw):
    gradcache_backward((forward or forward_of)(model), LOSS, micro_batches, **kw)
    return buffers(model)


# --- towers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower", list(TOWERS))
def test_running_stats_are_one_update_from_the_whole_batch(tower):
    model, batch = make_model(tower), make_batch(tower)
    micro_batches = split_batch(batch, K)
    before = buffers(model)
    want_full = full_batch_step(model, batch)
    want_concat = one_update_over_concatenated_inputs(model, micro_batches)
    got = run_gradcache(model, micro_batches, modules=model)
    input_fed = TOWERS[tower][2]
    assert_buffers_close(got, want_full, [input_fed])  # literally the full-batch step's
    assert_buffers_close(got, want_concat)  # every layer: one update from all B rows
    assert max_diff(got, before) > 1e-3, "the step did not move the statistics: weak test"
    if tower == "audio_transformer":  # spec_norm is its only BatchNorm
        assert got.keys() == {input_fed}
    else:  # deeper layers see per-micro-batch-normalised activations (inherent to GradCache)
        assert len(got) > 1 and max_diff(got, want_full) > 1e-6


@pytest.mark.parametrize("tower", ["ecg_resnet1d", "audio_transformer"])
def test_without_modules_statistics_are_updated_twice_per_micro_batch(tower):
    """Negative control: the comparisons above fail without the fix."""
    model, batch = make_model(tower), make_batch(tower)
    micro_batches = split_batch(batch, K)
    want = full_batch_step(model, batch)
    got = run_gradcache(model, micro_batches)  # modules=None: the old behaviour
    assert all(batches == 3 + 2 * K for _, _, batches in got.values())
    assert max_diff(got, want) > 1e-3


def test_momentum_none_cumulative_average_over_two_steps():
    """momentum=None: factor 1 / num_batches_tracked; two steps so the count carries over."""
    tower = "ecg_resnet1d"
    model = make_model(tower, momentum=None)
    for seed in (7, 8):
        batch = make_batch(tower, seed)
        micro_batches = split_batch(batch, K)
        want_full = full_batch_step(model, batch)
        want_concat = one_update_over_concatenated_inputs(model, micro_batches)
        got = run_gradcache(model, micro_batches, modules=model)
        assert_buffers_close(got, want_full, [TOWERS[tower][2]])
        assert_buffers_close(got, want_concat)
    assert all(batches == 5 for _, _, batches in got.values())


def test_single_micro_batch_path_is_a_plain_step():
    tower = "ecg_resnet1d"
    model, batch = make_model(tower), make_batch(tower)
    want = full_batch_step(model, batch)
    plain = copy.deepcopy(model)
    got = run_gradcache(model, [batch], modules=model)
    assert_buffers_close(got, want)
    assert_buffers_close(run_gradcache(plain, [batch]), want)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)


# --- layer kinds ------------------------------------------------------------------------------------


class OddBatchNorms(torch.nn.Module):
    """A 2-d BatchNorm called twice per forward, one in eval mode, one without running
    statistics, one never called; returns (features, text_features, scale)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.shared = torch.nn.BatchNorm2d(3, momentum=0.3)
        self.frozen = torch.nn.BatchNorm2d(3).eval()
        self.stateless = torch.nn.BatchNorm2d(3, track_running_stats=False)
        self.unused = torch.nn.BatchNorm1d(4)
        self.text = torch.nn.Linear(5, 12)
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.0]))

    def forward(self, image, text):
        x = self.shared(self.conv(image))
        x = self.stateless(self.frozen(torch.relu(x)))
        x = self.shared(x * 2 + 1)
        return x.flatten(1)[:, :12], self.text(text), self.logit_scale.exp()


def test_shared_eval_and_untracked_layers():
    torch.manual_seed(0)
    model = OddBatchNorms().double()
    model.frozen.running_var.fill_(2.0)
    batch = {"image": torch.randn(BATCH, 2, 4, 4, dtype=torch.float64),
             "text": torch.randn(BATCH, 5, dtype=torch.float64)}
    micro_batches = split_batch(batch, K)
    forward = lambda m: lambda mb: m(mb["image"], mb["text"])  # noqa: E731
    before = buffers(model)
    want = one_update_over_concatenated_inputs(model, micro_batches, forward)
    got = run_gradcache(model, micro_batches, forward, modules=model)
    assert_buffers_close(got, want)
    assert got["shared"][2] == 2  # two calls per forward: two sequential updates, as one forward
    assert max_diff({"shared": got["shared"]}, {"shared": before["shared"]}) > 1e-3
    assert_buffers_close(got, before, ["frozen", "unused"])
    assert model.stateless.running_mean is None


def test_different_call_counts_per_micro_batch_are_refused():
    bn = torch.nn.BatchNorm1d(3).double()
    calls = iter(range(100))

    def forward(mb):
        x = bn(mb["x"])
        if next(calls) == 1:  # the second micro-batch calls the layer twice
            x = bn(x)
        return x, x, torch.tensor(1.0, dtype=torch.float64)

    with pytest.raises(RuntimeError, match=r"called \[1, 2\] times"):
        gradcache_backward(forward, LOSS, split_batch({"x": torch.randn(4, 3, dtype=torch.float64)}, 2), modules=bn)



# --- DDP's forward-time buffer sync ---------------------------------------------------------------


class SyncsBuffersAtForward(torch.nn.Module):
    """Does to ``model`` what DDP (default ``broadcast_buffers``) does on rank > 0: before
    every forward, rank 0's buffers overwrite this rank's.  Single process, so the test is
    cheap; the same check over 2 real gloo ranks agrees."""

    def __init__(self, model, rank0_buffers):
        super().__init__()
        self.module, self.rank0_buffers = model, rank0_buffers

    def forward(self, *inputs):
        with torch.no_grad():
            for name, bn in batchnorms(self.module).items():
                mean, var, batches = self.rank0_buffers[name]
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.fill_(batches)
        return self.module(*inputs)


def test_buffers_synced_at_forward_are_the_starting_point():
    """The snapshot is taken at a layer's first call, after the sync: the step ends with rank
    0's buffers updated from this rank's rows, as a plain DDP step would."""
    tower = "audio_transformer"  # its only BatchNorm is input-fed: the full-batch step is the reference
    rank0 = buffers(make_model(tower))
    this_rank = make_model(tower)
    for bn in batchnorms(this_rank).values():
        bn.running_mean.add_(5.0)  # this rank's own buffers drifted from rank 0's
    batch = make_batch(tower)
    want = full_batch_step(SyncsBuffersAtForward(this_rank, rank0), batch)
    own_start = {"module." + name: value for name, value in full_batch_step(this_rank, batch).items()}
    model = SyncsBuffersAtForward(this_rank, rank0)
    got = run_gradcache(model, split_batch(batch, K), modules=model)
    assert_buffers_close(got, want)
    assert max_diff(got, own_start) > 1, "starting from this rank's own buffers must differ: weak test"
