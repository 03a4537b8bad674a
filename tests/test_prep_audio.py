"""clip-prep shard --modality audio: decode, mono, resample, crop, FLAC, rejects."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")

try:  # tests/ is a rootdir-less folder today; keep working if it becomes a package
    from prep_fixtures import read_json, read_rejects, read_shards, run_cli
except ImportError:
    from tests.prep_fixtures import read_json, read_rejects, read_shards, run_cli


def tone(frequency: float, rate: int, seconds: float, channels: int) -> np.ndarray:
    time = np.arange(int(round(rate * seconds))) / rate
    mono = 0.5 * np.sin(2 * np.pi * frequency * time)
    # Channels carry the same tone at different levels, so the mono mix keeps its frequency.
    return np.stack([mono * (1.0 - 0.3 * c) for c in range(channels)], axis=1)


def audio_bytes(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


INPUTS = {  # name: (format, rate, channels, seconds, tone Hz)
    "a.wav": ("WAV", 44_100, 2, 1.5, 440.0),
    "b.flac": ("FLAC", 22_050, 1, 0.8, 1000.0),
    "c.ogg": ("OGG", 32_000, 3, 1.2, 660.0),
    "d.wav": ("WAV", 8_000, 1, 2.0, 300.0),
}


def write_inputs(folder, inputs=INPUTS):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (fmt, rate, channels, seconds, frequency) in inputs.items():
        (folder / name).write_bytes(audio_bytes(tone(frequency, rate, seconds, channels), rate, fmt))
        (folder / name).with_suffix(".txt").write_text(f"a {frequency:.0f} Hz tone", encoding="utf-8")


def test_inputs_become_mono_flac_at_the_target_rate(tmp_path):
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "in", "--out", out, "--modality", "audio", "--sample-rate", 16000,
                   "--workers", 1) == 0
    samples = read_shards(out)
    assert len(samples) == len(INPUTS)
    for sample, (name, (fmt, rate, channels, seconds, frequency)) in zip(samples.values(), INPUTS.items()):
        assert set(sample) == {"flac", "txt", "json"}
        decoded, decoded_rate = soundfile.read(io.BytesIO(sample["flac"]))
        info = soundfile.info(io.BytesIO(sample["flac"]))
        assert (decoded.ndim, decoded_rate, info.format, info.subtype) == (1, 16000, "FLAC", "PCM_16")
        assert len(decoded) == pytest.approx(16000 * seconds, abs=1)
        assert peak_frequency(decoded, 16000) == pytest.approx(frequency, abs=3)
        metadata = json.loads(sample["json"])
        source = tmp_path / "in" / name
        assert metadata["source"] == str(source)
        assert metadata["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert (metadata["original_sample_rate"], metadata["original_channels"]) == (rate, channels)
        assert metadata["original_duration"] == pytest.approx(seconds, abs=1e-3)
        assert metadata["duration"] == pytest.approx(len(decoded) / 16000)
        assert metadata["sample_rate"] == 16000 and metadata["cropped"] is False
        assert metadata["caption"] == sample["txt"].decode() == f"a {frequency:.0f} Hz tone"


def test_default_rate_is_48k_and_max_duration_crops(tmp_path):
    write_inputs(tmp_path / "in", {"long.wav": ("WAV", 44_100, 2, 1.5, 440.0), "short.flac": ("FLAC", 22_050, 1, 0.8, 1000.0)})
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "in", "--out", out, "--modality", "audio", "--max-duration", 1.0,
                   "--workers", 1) == 0
    long_clip, short_clip = read_shards(out).values()
    decoded, rate = soundfile.read(io.BytesIO(long_clip["flac"]))
    assert (rate, len(decoded)) == (48000, 48000)
    assert peak_frequency(decoded, rate) == pytest.approx(440, abs=3)
    metadata = json.loads(long_clip["json"])
    assert metadata["cropped"] is True and metadata["crop_policy"] == "crop_start" and metadata["duration"] == 1.0
    assert metadata["original_duration"] == pytest.approx(1.5)
    short = json.loads(short_clip["json"])
    assert short["cropped"] is False and short["duration"] == pytest.approx(0.8, abs=1e-4)
    assert read_json(out / "manifest.json")["options"]["max_duration"] == 1.0


def test_bad_inputs_are_rejected_with_reasons_and_the_books_balance(tmp_path):
    folder = tmp_path / "in"
    write_inputs(folder, {"good.wav": ("WAV", 16_000, 1, 0.5, 500.0)})
    good_wav = (folder / "good.wav").read_bytes()
    long_flac = audio_bytes(np.random.default_rng(0).uniform(-0.5, 0.5, (40_000, 1)), 16_000, "FLAC")
    bad = {
        "zero.wav": b"",
        "text.wav": b"this is not audio at all, just some text\n" * 20,
        "empty.wav": audio_bytes(np.zeros((0, 1)), 16_000, "WAV"),
        "truncated.wav": good_wav[: len(good_wav) // 2],
        "truncated.flac": long_flac[: len(long_flac) // 2],
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text("caption", encoding="utf-8")
    (folder / "nocaption.wav").write_bytes(good_wav)
    out = tmp_path / "out"
    assert run_cli("shard", folder, "--out", out, "--modality", "audio", "--workers", 2) == 0
    reasons = {record["source"].rsplit("/", 1)[-1]: record["reason"] for record in read_rejects(out)}
    assert reasons == {
        "zero.wav": "empty_file",
        "text.wav": "not_audio",
        "empty.wav": "empty_audio",
        "truncated.wav": "truncated_audio",
        "truncated.flac": "truncated_audio",
        "nocaption.wav": "missing_caption",
    }
    manifest = read_json(out / "manifest.json")
    assert (manifest["written"], manifest["rejected"], manifest["inputs"]) == (1, 6, 7)


def test_streamed_wav_with_unknown_length_is_accepted(tmp_path):
    """espeak-ng --stdout and other streamers write a placeholder data size (0x7FFFF000)."""
    data = bytearray(audio_bytes(tone(440, 16_000, 0.5, 1), 16_000, "WAV"))
    data_chunk = data.index(b"data")
    data[data_chunk + 4:data_chunk + 8] = (0x7FFFF000).to_bytes(4, "little")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s.wav").write_bytes(bytes(data))
    (tmp_path / "in" / "s.txt").write_text("streamed", encoding="utf-8")
    assert run_cli("shard", tmp_path / "in", "--out", tmp_path / "out", "--modality", "audio", "--workers", 1) == 0
    assert read_json(tmp_path / "out" / "manifest.json")["written"] == 1


def test_rate_above_flac_limit_is_a_usage_error(tmp_path, capsys):
    write_inputs(tmp_path / "in", {"a.wav": ("WAV", 8_000, 1, 0.1, 440.0)})
    assert run_cli("shard", tmp_path / "in", "--out", tmp_path / "out", "--modality", "audio",
                   "--sample-rate", 700000) == 2
    assert "655350" in capsys.readouterr().err
