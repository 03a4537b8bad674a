"""Audio evaluation over whole clips: the eval transform packs up to ``max_eval_crops`` crops
(``pack_eval_crops``), the tower averages the embeddings of the real ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from clip_train.data.signal_transforms import DEFAULT_MAX_EVAL_CROPS, AudioEvalTransform, signal_transforms
from clip_train.models import audio
from clip_train.models.builder import resolve_model_config
from clip_train.models.dual import build_signal_model
from clip_train.models.towers import build_tower

CLIP = 8000
FRONTEND = {"sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 32, "f_min": 50.0, "f_max": 8000.0}
TOWERS = {
    "audio_transformer": {"tower": "audio_transformer", "frontend": FRONTEND, "clip_samples": CLIP,
                          "max_eval_crops": 4, "patch_size": [16, 10], "width": 32, "depth": 1, "heads": 2},
    "audio_timm": {"tower": "audio_timm", "model_name": "test_resnet", "frontend": FRONTEND, "clip_samples": CLIP,
                   "max_eval_crops": 4, "model_kwargs": {"zero_init_last": False}},
}
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
PREPROCESS = {"modality": "audio", "clip_samples": CLIP, "max_eval_crops": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def wave(samples: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(samples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def eval_tower(name: str) -> torch.nn.Module:
    """A float64 tower in eval mode whose BatchNorm statistics are no longer the initial ones."""
    torch.manual_seed(0)
    tower = build_tower(TOWERS[name], 16).double()
    tower.train()
    with torch.no_grad():
        tower(torch.randn(4, CLIP, dtype=torch.float64))
    return tower.eval()


def eval_transform():
    return signal_transforms("audio", PREPROCESS, augment=False)[1]


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_long_clip_is_the_mean_of_its_crop_embeddings(name):
    tower, clip = eval_tower(name), wave(int(2.5 * CLIP), 1)  # 20000 samples
    packed = eval_transform()(clip)
    assert packed.shape == (4, CLIP + 1) and packed.dtype == torch.float64
    assert packed[:, CLIP].tolist() == [1.0, 1.0, 1.0, 0.0]  # ceil(2.5) = 3 real crops, one padding row
    starts = [0, 6000, 12000]  # evenly spaced, first at 0, last ending at 20000
    assert audio.eval_crop_starts(len(clip), CLIP, 4) == starts
    with torch.no_grad():
        got = tower(packed[None])
        reference = torch.stack([tower.encode(clip[s:s + CLIP][None])[0] for s in starts]).mean(dim=0)
        raw = tower(clip[None])  # the tower's own multi-crop of the raw clip agrees
    torch.testing.assert_close(got[0], reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(raw, got, rtol=0, atol=1e-10)
    assert not torch.allclose(got[0], tower.encode(clip[:CLIP][None])[0], atol=1e-4)  # not the first crop only


def test_dual_encoder_averages_tower_features_before_projection_and_normalisation():
    torch.manual_seed(0)
    model = build_signal_model({"embed_dim": 16, "signal_cfg": TOWERS["audio_transformer"],
                                "text_cfg": TEXT_CFG}).double().eval()
    clip = wave(int(2.5 * CLIP), 2)
    starts = audio.eval_crop_starts(len(clip), CLIP, 4)
    with torch.no_grad():
        got = model.encode_image(eval_transform()(clip)[None], normalize=True)
        mean_feature = torch.stack([model.signal.encode(clip[s:s + CLIP][None]) for s in starts]).mean(dim=0)
        reference = F.normalize(model.signal_proj(mean_feature), dim=-1)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("samples", [3000, CLIP])
def test_short_clip_is_one_zero_padded_crop(samples):
    tower, clip = eval_tower("audio_transformer"), wave(samples, 3)
    packed = eval_transform()(clip)
    padded = F.pad(clip, (0, CLIP - samples))
    assert torch.equal(packed[0, :CLIP], padded) and packed[0, CLIP] == 1.0
    assert not packed[1:].any()  # padding rows: zeros, flag 0
    with torch.no_grad():
        torch.testing.assert_close(tower(packed[None]), tower.encode(padded[None]), rtol=0, atol=1e-10)


def test_mixed_lengths_collate_and_each_row_is_its_own_clip():
    tower, transform = eval_tower("audio_transformer"), eval_transform()
    clips = [wave(n, seed) for seed, n in enumerate([3000, CLIP, 20000, 9000, 100000])]
    batch = default_collate([transform(c) for c in clips])
    assert batch.shape == (len(clips), 4, CLIP + 1)
    assert batch[:, :, CLIP].sum(dim=1).tolist() == [1.0, 1.0, 3.0, 2.0, 4.0]
    with torch.no_grad():
        together = tower(batch)
        for row, clip in zip(together, clips):
            torch.testing.assert_close(row, tower(transform(clip)[None])[0], rtol=0, atol=1e-10)


def test_clip_longer_than_the_cap_uses_exactly_max_eval_crops():
    clip = wave(100000, 4)  # 12.5 x clip_samples, cap 4
    packed = eval_transform()(clip)
    starts = [0, 30667, 61333, 92000]  # 4 evenly spaced crops over the whole clip, last ending at its end
    assert audio.eval_crop_starts(len(clip), CLIP, 4) == starts
    assert packed.shape == (4, CLIP + 1) and packed[:, CLIP].tolist() == [1.0] * 4
    for row, s in zip(packed, starts):
        assert torch.equal(row[:CLIP], clip[s:s + CLIP])


def test_max_eval_crops_default_and_one():
    for cfg in ({"clip_samples": CLIP}, {"clip_samples": CLIP, "max_eval_crops": None}):
        transform = signal_transforms("audio", cfg, augment=False)[1]
        assert transform.max_crops == DEFAULT_MAX_EVAL_CROPS == 4
    one = AudioEvalTransform(CLIP, 1)(wave(20000, 5))  # 1: the old behaviour, the first window
    assert one.shape == (1, CLIP + 1) and torch.equal(one[0, :CLIP], wave(20000, 5)[:CLIP])
    with pytest.raises(ValueError, match="max_eval_crops"):
        AudioEvalTransform(CLIP, 0)


def test_bundled_demo_config_eval_transform():
    _, preprocess = resolve_model_config("demo-audio")
    train_tf, eval_tf = signal_transforms("audio", preprocess, augment=True)
    assert eval_tf(torch.randn(40000)).shape == (4, 16001)
    assert train_tf(torch.randn(40000)).shape == (16000,)  # training still takes one clip_samples window


def test_layout_survives_a_bfloat16_cast():
    transform = eval_transform()
    batch = default_collate([transform(wave(n, n).float()) for n in (3000, 20000, 100000)]).to(torch.bfloat16)
    crops, real = audio.unpack_eval_crops(batch, CLIP)
    assert real.sum(dim=1).tolist() == [1, 3, 4]
    tower = build_tower(TOWERS["audio_transformer"], 16).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = tower(batch)
    assert out.dtype == torch.bfloat16 and out.shape == (3, tower.output_dim) and torch.isfinite(out).all()


def test_training_transform_is_unchanged():
    train_tf, _ = signal_transforms("audio", PREPROCESS, augment=True)
    no_aug, _ = signal_transforms("audio", PREPROCESS, augment=False)
    clip = wave(20000, 6).float()
    assert train_tf(clip).shape == (CLIP,)
    assert torch.equal(no_aug(clip), clip[:CLIP])


def test_malformed_packed_input_is_rejected():
    tower = eval_tower("audio_transformer")
    with pytest.raises(ValueError, match="clip_samples \\+ 1"):
        tower(torch.zeros(2, 4, CLIP, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one real crop"):
        tower(torch.zeros(2, 4, CLIP + 1, dtype=torch.float64))
