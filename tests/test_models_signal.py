"""Audio and ECG towers, the log-mel front end, signal augmentations and the signal-text dual encoder."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clip_train.models import audio, ecg
from clip_train.models.dual import (CONFIG_NAME, WEIGHTS_NAME, build_signal_model, load_signal_model,
                                    save_signal_model, signal_tokenizer)
from clip_train.models.towers import TOWERS, build_tower, tower_names

SR = 16000
DEMO_FRONTEND = {"sample_rate": SR, "n_fft": 400, "hop_length": 160, "n_mels": 64, "f_min": 50.0, "f_max": 8000.0}
TINY_FRONTEND = {**DEMO_FRONTEND, "n_mels": 32}
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_TOWERS = {
    "audio_transformer": {"tower": "audio_transformer", "frontend": TINY_FRONTEND, "clip_samples": 8000,
                          "patch_size": [16, 10], "width": 32, "depth": 1, "heads": 2},
    "audio_timm": {"tower": "audio_timm", "model_name": "test_resnet", "frontend": TINY_FRONTEND,
                   "clip_samples": 8000, "model_kwargs": {"zero_init_last": False}},
    "ecg_resnet1d": {"tower": "ecg_resnet1d", "widths": [8, 16, 16, 32], "blocks": [1, 1, 1, 1],
                     "width": 24, "pool_heads": 4},
    "ecg_vit1d": {"tower": "ecg_vit1d", "patch_size": 50, "width": 32, "depth": 1, "heads": 2, "max_len": 5000},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tower(TINY_TOWERS[name], embed_dim=16)


def assert_all_grads(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


# ---------------------------------------------------------------- mel front end


def test_mel_scales_known_points():
    assert audio.hz_to_mel(1000.0, "htk") == pytest.approx(1000.0, abs=0.1)
    assert audio.hz_to_mel(500.0, "slaney") == pytest.approx(7.5)  # linear part: 200/3 Hz per mel
    assert audio.hz_to_mel(1000.0, "slaney") == pytest.approx(15.0)
    assert audio.hz_to_mel(6400.0, "slaney") == pytest.approx(42.0)  # 27 mels per factor 6.4 above 1 kHz
    f = np.array([0.0, 50.0, 999.0, 1000.0, 3000.0, 14000.0])
    for scale in ("htk", "slaney"):
        np.testing.assert_allclose(audio.mel_to_hz(audio.hz_to_mel(f, scale), scale), f, atol=1e-6)


@pytest.mark.parametrize("scale", ["htk", "slaney"])
def test_filters_triangular_peak_at_mel_spaced_centres(scale):
    n_mels, f_min, f_max = 40, 50.0, 8000.0
    freqs = np.arange(0.0, 8000.5, 0.5)
    fb = audio.mel_filterbank(freqs, n_mels, f_min, f_max, scale, norm=None)
    # Expected edges, computed here independently of the module's helpers.
    if scale == "htk":
        mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
        inv = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    else:
        mel = lambda f: np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(f / 1000) / np.log(6.4))  # noqa: E731
        inv = lambda m: np.where(m < 15, 200 * m / 3, 1000 * 6.4 ** ((m - 15) / 27))  # noqa: E731
    edges = inv(np.linspace(mel(f_min), mel(f_max), n_mels + 2))
    for i, row in enumerate(fb):
        lo, centre, hi = edges[i], edges[i + 1], edges[i + 2]
        assert abs(freqs[row.argmax()] - centre) <= 0.5 and row.max() == pytest.approx(1.0, abs=0.01)
        assert np.all(row[(freqs <= lo) | (freqs >= hi)] == 0)
        for side in ((freqs > lo + 1e-6) & (freqs < centre), (freqs > centre) & (freqs < hi - 1e-6)):
            vals = row[side]
            assert np.all(vals > 0)
            np.testing.assert_allclose(np.diff(vals, 2), 0, atol=1e-9)  # straight line on each side
        assert np.all(np.diff(row[(freqs > lo) & (freqs < centre)]) > 0)
        assert np.all(np.diff(row[(freqs > centre) & (freqs < hi)]) < 0)


def test_filters_cover_f_min_to_f_max():
    freqs = np.arange(0.0, 8000.5, 0.5)
    f_min, f_max = 50.0, 7000.0
    fb = audio.mel_filterbank(freqs, 64, f_min, f_max, "slaney", norm=None)
    total = fb.sum(axis=0)
    assert np.all(total[(freqs <= f_min) | (freqs >= f_max)] == 0)
    assert np.all(total[(freqs > f_min) & (freqs < f_max)] > 0)
    edges = audio.mel_edges(64, f_min, f_max)
    inner = (freqs >= edges[1]) & (freqs <= edges[-2])  # between the first and last centre
    np.testing.assert_allclose(total[inner], 1.0, atol=1e-9)  # overlapping triangles sum to one
    slaney = audio.mel_filterbank(freqs, 64, f_min, f_max, "slaney", norm="slaney")
    np.testing.assert_allclose(np.trapezoid(slaney, freqs, axis=1), 1.0, rtol=1e-3)  # equal areas


@pytest.mark.parametrize("kwargs", [DEMO_FRONTEND, {}])  # demo (16 kHz) and CLAP defaults (48 kHz)
def test_no_empty_filters(kwargs):
    fb = audio.LogMelSpectrogram(**kwargs).mel_fb
    assert fb.shape[0] == kwargs.get("n_mels", 64) and torch.all(fb.sum(dim=1) > 0)


def test_pure_tone_lands_in_its_mel_bin():
    frontend = audio.LogMelSpectrogram(**DEMO_FRONTEND)
    edges = audio.mel_edges(64, 50.0, 8000.0)
    t = torch.arange(SR, dtype=torch.float32) / SR
    bins = []
    for freq in (1000.0, 4000.0):
        logmel = frontend(torch.sin(2 * math.pi * freq * t)[None])[0]
        b = int(logmel.mean(dim=1).argmax())
        assert edges[b] < freq < edges[b + 2], (freq, edges[b:b + 3])  # inside the filter's support
        spacing = edges[b + 2] - edges[b + 1]
        assert abs(edges[b + 1] - freq) <= spacing  # and the filter is one of the two nearest
        bins.append(b)
    assert bins[0] < bins[1]


@pytest.mark.parametrize("samples", [16000, 16001, 15999, 8037])
def test_frame_count_with_centre_padding(samples):
    frontend = audio.LogMelSpectrogram(**DEMO_FRONTEND)
    assert frontend(torch.randn(2, samples)).shape == (2, 64, 1 + samples // 160)
    assert frontend.num_frames(samples) == 1 + samples // 160


def test_clap_defaults_shape():
    assert audio.LogMelSpectrogram()(torch.randn(1, 480000)).shape == (1, 64, 1001)


def _numpy_power(x: np.ndarray, n_fft: int, win_length: int, hop: int) -> np.ndarray:
    padded = np.pad(x, n_fft // 2, mode="reflect")
    window = np.zeros(n_fft)
    left = (n_fft - win_length) // 2
    window[left:left + win_length] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)
    frames = [padded[t * hop:t * hop + n_fft] * window for t in range(1 + len(x) // hop)]
    return (np.abs(np.fft.rfft(np.stack(frames), axis=1)) ** 2).T


@pytest.mark.parametrize("win_length", [400, 320])
def test_stft_power_matches_numpy_fft(win_length):
    frontend = audio.LogMelSpectrogram(**DEMO_FRONTEND, win_length=win_length)
    x = np.random.default_rng(0).standard_normal(4000)
    expected = _numpy_power(x, 400, win_length, 160)
    got = frontend.power_spectrogram(torch.tensor(x)[None])[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8 * expected.max())
    # The whole float32 front end against the numpy pipeline, in dB.
    fb = audio.mel_filterbank(np.fft.rfftfreq(400, 1 / SR), 64, 50.0, 8000.0)
    ref_db = 10 * np.log10(np.maximum(fb @ expected, 1e-10))
    np.testing.assert_allclose(frontend(torch.tensor(x, dtype=torch.float32)[None])[0].numpy(), ref_db, atol=2e-3)


def test_top_db_clamps_below_record_maximum():
    frontend = audio.LogMelSpectrogram(**DEMO_FRONTEND, top_db=40.0)
    out = frontend(torch.randn(2, 4000) * torch.tensor([[1.0], [1e-3]]))
    for rec in out:
        assert rec.max() - rec.min() <= 40.0 + 1e-4


# ---------------------------------------------------------------- audio towers


@pytest.mark.parametrize("name", ["audio_transformer", "audio_timm"])
def test_audio_tower_shapes_and_gradients(name):
    tower = tiny(name).train()
    for samples in (8000, 4000, 12000):  # the clip, shorter (positions cropped), longer (interpolated)
        assert tower(torch.randn(2, samples)).shape == (2, tower.output_dim)
    tower.zero_grad()
    tower(torch.randn(2, 8000)).square().sum().backward()
    assert_all_grads(tower)


def test_audio_transformer_time_strips_and_mean_pool():
    cfg = {**TINY_TOWERS["audio_transformer"], "patch_size": [32, 4], "pool": "mean", "spec_norm": "fixed",
           "spec_mean": -40.0, "spec_std": 20.0}
    tower = build_tower(cfg, 16)
    assert tower(torch.randn(3, 8000)).shape == (3, 32)
    with pytest.raises(ValueError, match="must divide n_mels"):
        build_tower({**cfg, "patch_size": [10, 4]}, 16)


def test_eval_crop_starts_cover_the_clip():
    assert audio.eval_crop_starts(8000, 8000) == [0]
    starts = audio.eval_crop_starts(20000, 8000)
    assert starts == [0, 6000, 12000]  # ceil(20000 / 8000) = 3 crops, last one ends at 20000
    assert audio.eval_crop_starts(100000, 8000, max_crops=4) == [0, 30667, 61333, 92000]


@pytest.mark.parametrize("name", ["audio_transformer", "audio_timm"])
def test_eval_multicrop_is_mean_of_crop_embeddings(name):
    tower = tiny(name)
    tower.train()
    tower(torch.randn(4, 8000))  # move BatchNorm statistics away from their initial values
    tower.eval()
    wave = torch.randn(2, 20000, generator=gen(1))
    with torch.no_grad():
        got = tower(wave)
        crops = [tower(wave[:, s:s + 8000]) for s in audio.eval_crop_starts(20000, 8000)]
        whole = tower.encode(wave)
    torch.testing.assert_close(got, torch.stack(crops).mean(dim=0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, whole, atol=1e-4)  # eval really crops rather than encoding all at once


def test_random_crop():
    wave = torch.arange(30.0).repeat(4, 1)
    out = audio.random_crop(wave, 10, gen(3))
    assert out.shape == (4, 10)
    for row in out:  # each row is a contiguous window of the original
        assert torch.equal(row, torch.arange(row[0].item(), row[0].item() + 10))
    assert torch.equal(out, audio.random_crop(wave, 10, gen(3)))
    assert torch.equal(audio.random_crop(torch.ones(2, 6), 10), torch.cat([torch.ones(2, 6), torch.zeros(2, 4)], 1))


def test_audio_augmentations():
    wave = torch.randn(8, 1000, generator=gen(0))
    gained = audio.random_gain(wave, (-6.0, 6.0), gen(1))
    assert torch.equal(gained, audio.random_gain(wave, (-6.0, 6.0), gen(1)))
    db = 20 * torch.log10(gained.norm(dim=1) / wave.norm(dim=1))
    assert torch.all(db.abs() <= 6.0 + 1e-4) and db.std() > 0.5
    shifted = audio.random_time_shift(wave, 0.1, gen(2))
    assert torch.equal(shifted, audio.random_time_shift(wave, 0.1, gen(2)))
    for row, orig in zip(shifted, wave):  # a circular shift by at most 100 samples
        assert any(torch.equal(row, torch.roll(orig, s)) for s in range(-100, 101))
    mixed, perm, lam = audio.mixup(wave, 0.4, gen(4))
    mixed2, perm2, lam2 = audio.mixup(wave, 0.4, gen(4))
    assert torch.equal(mixed, mixed2) and torch.equal(perm, perm2) and lam == lam2
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(8))
    torch.testing.assert_close(mixed, lam * wave + (1 - lam) * wave[perm])
    lams = [audio.mixup(wave, 0.4, gen(s))[2] for s in range(200)]
    assert abs(np.mean(lams) - 0.5) < 0.06 and np.mean(np.minimum(lams, 1 - np.array(lams))) < 0.25


# ---------------------------------------------------------------- ECG towers and augmentations


def test_normalize_leads():
    x = torch.randn(3, 12, 500, dtype=torch.float64) * torch.rand(3, 12, 1) * 5 + torch.randn(3, 12, 1) * 3
    y = ecg.normalize_leads(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 12, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.std(-1, unbiased=False), torch.ones(3, 12, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(ecg.normalize_leads(torch.zeros(1, 2, 10)), torch.zeros(1, 2, 10))  # flat lead: no NaN


@pytest.mark.parametrize("name", ["ecg_resnet1d", "ecg_vit1d"])
def test_ecg_tower_shapes_invariance_and_gradients(name):
    tower = tiny(name)
    for samples in (5000, 2500):
        assert tower(torch.randn(2, 12, samples)).shape == (2, tower.output_dim)
    tower.eval()
    x = torch.randn(2, 12, 2500, generator=gen(5))
    scale = torch.rand(2, 12, 1, generator=gen(6)) * 10 + 0.1
    offset = torch.randn(2, 12, 1, generator=gen(7)) * 100
    with torch.no_grad():
        torch.testing.assert_close(tower(x * scale + offset), tower(x), rtol=1e-4, atol=1e-4)
    tower.train().zero_grad()
    tower(torch.randn(2, 12, 5000)).square().sum().backward()
    assert_all_grads(tower)


def test_ecg_vit_longer_than_max_len_and_grad_checkpointing():
    tower = tiny("ecg_vit1d")
    assert tower(torch.randn(1, 12, 6000)).shape == (1, 32)  # positions interpolated
    x = torch.randn(2, 12, 1000)
    grads = []
    for enable in (False, True):
        tower.set_grad_checkpointing(enable)
        tower.zero_grad()
        tower(x).sum().backward()
        grads.append([p.grad.clone() for p in tower.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_ecg_augmentations_deterministic():
    x = torch.randn(4, 12, 1000, generator=gen(0))
    augs = [lambda g: ecg.amplitude_scale(x, (0.5, 1.5), g), lambda g: ecg.baseline_wander(x, generator=g),
            lambda g: ecg.gaussian_noise(x, 0.1, g), lambda g: ecg.random_lead_dropout(x, 0.3, g)]
    for aug in augs:
        assert torch.equal(aug(gen(1)), aug(gen(1)))
        assert not torch.equal(aug(gen(1)), aug(gen(2)))
    ratio = ecg.amplitude_scale(x, (0.5, 1.5), gen(3)) / x
    assert torch.allclose(ratio, ratio[..., :1]) and ratio.min() >= 0.5 and ratio.max() <= 1.5
    noise = ecg.gaussian_noise(x, 0.1, gen(4)) - x
    assert noise.std().item() == pytest.approx(0.1, rel=0.05)


def test_random_lead_dropout_zeros_exactly_the_chosen_leads():
    x = torch.randn(64, 12, 50, generator=gen(0)) + 3.0
    out, mask = ecg.random_lead_dropout(x, 0.25, gen(1), return_mask=True)
    assert mask.shape == (64, 12) and mask.dtype == torch.bool
    assert torch.all(out[mask] == 0) and torch.equal(out[~mask], x[~mask])
    assert abs(mask.float().mean().item() - 0.25) < 0.05
    out_all, mask_all = ecg.random_lead_dropout(x, 1.0, gen(2), return_mask=True)
    assert torch.all(mask_all.sum(dim=1) == 11)  # never every lead of a record
    assert torch.equal(out_all, ecg.random_lead_dropout(x, 1.0, gen(2)))


def test_baseline_wander_is_low_frequency():
    sr, seconds = 500, 10
    x = torch.randn(8, 12, sr * seconds, generator=gen(0), dtype=torch.float64)
    added = ecg.baseline_wander(x, sample_rate=sr, amplitude=0.5, freq_range=(0.05, 0.5), generator=gen(1)) - x
    assert added.abs().amax() > 0.01
    power = np.abs(np.fft.rfft(added.numpy(), axis=-1)) ** 2
    freqs = np.fft.rfftfreq(sr * seconds, 1 / sr)
    low = power[..., freqs <= 1.0].sum() / power.sum()
    assert low > 0.95, low
    assert added.abs().amax(dim=-1).max() <= 0.5 * x.std(-1).max() * 1.01  # amplitude relative to lead std


@pytest.mark.parametrize("name", sorted(TINY_TOWERS))
def test_towers_run_in_bfloat16(name):
    """DeepSpeed bf16 casts the module; the float32 spectrogram / normalisation must follow it."""
    tower = tiny(name).to(torch.bfloat16).eval()
    x = torch.randn(2, 8000) if name.startswith("audio") else torch.randn(2, 12, 1000)
    with torch.no_grad():
        out = tower(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, tower.output_dim) and torch.isfinite(out).all()


# ---------------------------------------------------------------- registry and dual encoder


def model_cfg(tower: str, **extra) -> dict:
    return {"embed_dim": 16, "signal_cfg": TINY_TOWERS[tower], "text_cfg": TEXT_CFG, **extra}


def test_registry_names_and_errors():
    assert {"audio_transformer", "audio_timm", "ecg_resnet1d", "ecg_vit1d"} <= set(tower_names())
    with pytest.raises(KeyError) as err:
        build_signal_model({**model_cfg("ecg_vit1d"), "signal_cfg": {"tower": "ecg_resnet99"}})
    for name in ("audio_timm", "audio_transformer", "ecg_resnet1d", "ecg_vit1d"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="valid keys: .*patch_size"):
        build_tower({"tower": "ecg_vit1d", "patch": 25}, 16)
    with pytest.raises(ValueError, match="unknown keys"):
        build_tower({**TINY_TOWERS["audio_transformer"], "frontend": {"nfft": 400}}, 16)
    with pytest.raises(ValueError, match="unknown keys \\['vision_cfg'\\]"):
        build_signal_model({**model_cfg("ecg_vit1d"), "vision_cfg": {}})
    with pytest.raises(KeyError, match="already registered"):
        TOWERS.register("ecg_vit1d")(lambda cfg, dim: None)


@pytest.mark.parametrize("tower, shape", [("audio_transformer", (3, 8000)), ("ecg_resnet1d", (3, 12, 1000))])
def test_dual_encoder_forward(tower, shape):
    model = build_signal_model(model_cfg(tower))
    tokens = signal_tokenizer(model_cfg(tower))(["a dog barks", "sinus rhythm", "x"])
    assert tokens.shape == (3, 16)
    signal = torch.randn(shape)
    sig, txt, scale = model(signal, tokens)
    assert sig.shape == txt.shape == (3, 16)
    torch.testing.assert_close(sig.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert model.logit_scale.shape == (1,) and scale.shape == (1,)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.encode_image(signal).shape == model.encode_text(tokens).shape == (3, 16)
    model.eval()
    torch.testing.assert_close(model(signal, None)[0], model.encode_image(signal, normalize=True))
    assert model(signal, None)[1] is None and model(None, tokens)[0] is None
    torch.testing.assert_close(model(None, tokens)[1], model.encode_text(tokens, normalize=True))
    model.set_grad_checkpointing(True)
    model.train()
    sig, txt, scale = model(signal, tokens)
    (sig @ txt.T * scale).sum().backward()
    assert model.logit_scale.grad is not None and model.signal_proj.weight.grad is not None


def test_dual_encoder_logit_bias():
    model = build_signal_model(model_cfg("ecg_vit1d", init_logit_scale=math.log(10), init_logit_bias=-10.0))
    out = model(torch.randn(2, 12, 500), torch.randint(0, 49408, (2, 16)))
    assert len(out) == 4 and out[3].shape == (1,) and out[3].item() == -10.0
    assert out[2].item() == pytest.approx(10.0)


@pytest.mark.parametrize("tower, shape", [("audio_transformer", (2, 20000)), ("ecg_resnet1d", (2, 12, 1000))])
def test_save_load_round_trip(tmp_path, tower, shape):
    cfg = model_cfg(tower)
    model = build_signal_model(cfg)
    model(torch.randn(shape), None)  # train mode: BatchNorm running statistics change and must be saved
    model.eval()
    signal, tokens = torch.randn(shape), torch.randint(0, 49408, (2, 16))
    with torch.no_grad():
        expected = model(signal, tokens)
    save_signal_model(model, cfg, tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    loaded, loaded_cfg = load_signal_model(tmp_path)
    assert loaded_cfg == cfg
    loaded.eval()
    with torch.no_grad():
        got = loaded(signal, tokens)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
