"""clip-prep shard --modality ecg: WFDB / npy / csv records -> (12, 5000) arrays, rejects."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

wfdb = pytest.importorskip("wfdb")

from data_prep.ecg import STANDARD_LEADS, fill_nonfinite  # noqa: E402

try:  # tests/ is a rootdir-less folder today; keep working if it becomes a package
    from prep_fixtures import read_json, read_rejects, read_shards, run_cli
except ImportError:
    from tests.prep_fixtures import read_json, read_rejects, read_shards, run_cli


def lead_signal(lead_index: int, rate: float, seconds: float) -> np.ndarray:
    """A slow, distinct sine per lead (survives resampling; identifies the lead)."""
    time = np.arange(int(round(rate * seconds))) / rate
    return (lead_index + 1) * 0.1 * np.sin(2 * np.pi * (1 + lead_index * 0.25) * time)


def standard_record(rate: float, seconds: float) -> np.ndarray:
    return np.stack([lead_signal(i, rate, seconds) for i in range(12)])  # (12, samples)


def write_wfdb(folder, name, signal, names, rate, units=None):
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(name, fs=rate, units=units or ["mV"] * len(names), sig_name=list(names),
                p_signal=signal.T, fmt=["16"] * len(names), write_dir=str(folder))
    (folder / f"{name}.txt").write_text(f"record {name}", encoding="utf-8")


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def shard(tmp_path, *options, source="in") -> tuple:
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / source, "--out", out, "--modality", "ecg", "--workers", 1, *options) == 0
    return read_shards(out), read_json(out / "manifest.json"), out


def test_wfdb_record_is_reordered_resampled_filled_and_padded(tmp_path):
    order = np.random.default_rng(0).permutation(12)
    signal = standard_record(250, 8.0)  # 8 s at 250 Hz -> 4000 samples at 500 Hz, padded to 5000
    signal[1, 100:140] = np.nan  # a gap in lead II
    shuffled_names = [STANDARD_LEADS[i].upper() if i % 2 else STANDARD_LEADS[i] for i in order]  # case differs
    write_wfdb(tmp_path / "in", "rec1", signal[order], shuffled_names, 250)
    samples, manifest, _ = shard(tmp_path, "--ecg-dtype", "float32")
    assert (manifest["inputs"], manifest["written"]) == (1, 1)  # rec1.dat is not an input of its own
    sample = next(iter(samples.values()))
    assert set(sample) == {"npy", "txt", "json"}
    array = load_npy(sample["npy"])
    assert (array.shape, array.dtype) == ((12, 5000), np.float32)
    expected = standard_record(500, 8.0)
    error = np.abs(array[:, :4000] - expected)
    error[1, 190:290] = 0  # the filled gap is checked below
    assert error[:, 200:3800].max() < 0.01  # standard order, right rate (away from filter edges)
    gap = array[1, 200:280]  # lead II's gap: a straight line between its finite neighbours
    assert np.abs(np.diff(gap, 2)).max() < 1e-3 and np.abs(gap - expected[1, 200:280]).max() > 0.005
    assert np.all(array[:, 4000:] == 0)  # zero-padded at the end
    assert np.isfinite(array).all()
    metadata = json.loads(sample["json"])
    assert metadata["leads"] == list(STANDARD_LEADS) and metadata["sample_rate"] == 500
    assert metadata["units"] == ["mV"] * 12 and metadata["original_sample_rate"] == 250
    assert (metadata["original_length"], metadata["padded_samples"], metadata["cropped_samples"]) == (2000, 1000, 0)
    assert metadata["nonfinite_filled"] == 40 and metadata["length_policy"] == "crop_start"
    assert metadata["original_leads"] == shuffled_names and metadata["source_format"] == "wfdb"
    assert set(metadata["signal_files_sha256"]) == {"rec1.dat"} and len(metadata["sha256"]) == 64
    assert metadata["caption"] == "record rec1"


def test_fill_nonfinite_interpolates_and_extends_edges():
    row = np.array([[np.nan, 1.0, np.inf, np.nan, 4.0, np.nan]])
    filled, count = fill_nonfinite(row)
    assert count == 4
    np.testing.assert_allclose(filled, [[1.0, 1.0, 2.0, 3.0, 4.0, 4.0]])


@pytest.mark.parametrize("policy, start", [("crop_start", 0), ("crop_center", 500)])
def test_long_records_are_cropped_by_policy(tmp_path, policy, start):
    signal = standard_record(500, 12.0)
    write_wfdb(tmp_path / "in", "long", signal, STANDARD_LEADS, 500)
    samples, _, _ = shard(tmp_path, "--ecg-length-policy", policy, "--ecg-dtype", "float32")
    sample = next(iter(samples.values()))
    array = load_npy(sample["npy"])
    np.testing.assert_allclose(array, signal[:, start:start + 5000], atol=1e-3)
    metadata = json.loads(sample["json"])
    assert (metadata["cropped_samples"], metadata["length_policy"]) == (1000, policy)


def test_npy_and_csv_arrays_with_lead_names(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["V1", "II", "I"]
    array = np.stack([lead_signal(i, 100, 10.0) for i in (6, 1, 0)])  # V1, II, I at 100 Hz
    np.save(folder / "a.npy", array)  # leads x samples
    np.save(folder / "b.npy", array.T.astype(np.float32))  # samples x leads
    with open(folder / "c.csv", "w", encoding="utf-8") as table:
        table.write("V1,II,I\n")
        for row in array.T:
            table.write(",".join(f"{value:.6f}" for value in row) + "\n")
    for stem in "abc":
        (folder / f"{stem}.txt").write_text(f"array {stem}", encoding="utf-8")
    samples, manifest, _ = shard(tmp_path, "--leads", "i,II,v1", "--lead-names", ",".join(names),
                                 "--source-rate", 100, "--ecg-rate", 200, "--units", "uV")
    assert manifest["written"] == 3
    expected = np.stack([lead_signal(i, 200, 10.0) for i in (0, 1, 6)])
    for sample in samples.values():
        result = load_npy(sample["npy"])
        assert (result.shape, result.dtype) == ((3, 2000), np.float16)
        assert np.abs(result[:, 100:1900] - expected[:, 100:1900]).max() < 0.01
        metadata = json.loads(sample["json"])
        assert metadata["leads"] == ["i", "II", "v1"] and metadata["units"] == ["uV"] * 3
        assert metadata["original_sample_rate"] == 100 and metadata["original_length"] == 1000


def test_bad_records_are_rejected_and_companions_are_not_inputs(tmp_path):
    folder = tmp_path / "in"
    write_wfdb(folder, "good", standard_record(500, 10.0), STANDARD_LEADS, 500)
    write_wfdb(folder, "nov6", standard_record(500, 10.0)[:11], STANDARD_LEADS[:11], 500)
    write_wfdb(folder, "nodat", standard_record(500, 10.0), STANDARD_LEADS, 500)
    (folder / "nodat.dat").unlink()
    all_nan = np.full((12, 5000), np.nan)
    np.save(folder / "allnan.npy", all_nan)
    np.save(folder / "zerolen.npy", np.zeros((12, 0)))
    np.save(folder / "wrongcount.npy", np.zeros((11, 5000)))
    (folder / "notes.edf").write_bytes(b"0       not supported")
    (folder / "good.atr").write_bytes(b"annotations")  # a companion of good.hea, not an input
    for stem in ("allnan", "zerolen", "wrongcount", "notes"):
        (folder / f"{stem}.txt").write_text("caption", encoding="utf-8")
    out = tmp_path / "out"
    assert run_cli("shard", folder, "--out", out, "--modality", "ecg", "--workers", 2,
                   "--lead-names", ",".join(STANDARD_LEADS), "--source-rate", 500) == 0
    rejects = {record["source"].rsplit("/", 1)[-1]: record for record in read_rejects(out)}
    assert {name: record["reason"] for name, record in rejects.items()} == {
        "nov6.hea": "missing_leads",
        "nodat.hea": "missing_signal_file",
        "allnan.npy": "all_nan",
        "zerolen.npy": "empty_signal",
        "wrongcount.npy": "wrong_lead_count",
        "notes.edf": "unsupported_format",
    }
    assert "V6" in rejects["nov6.hea"]["detail"]
    manifest = read_json(out / "manifest.json")
    assert (manifest["inputs"], manifest["written"], manifest["rejected"]) == (7, 1, 6)
    assert [json.loads(s["json"])["source"] for s in read_shards(out).values()] == [str(folder / "good.hea")]


def test_arrays_without_lead_names_are_rejected(tmp_path):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "x.npy", np.zeros((12, 5000)))
    (tmp_path / "in" / "x.txt").write_text("caption", encoding="utf-8")
    _, manifest, out = shard(tmp_path)
    assert manifest["rejected"] == 1 and read_rejects(out)[0]["reason"] == "missing_lead_names"


def test_duplicate_configured_leads_are_a_usage_error(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert run_cli("shard", tmp_path / "in", "--out", tmp_path / "out", "--modality", "ecg", "--leads", "I,ii,II") == 2
    assert "named twice" in capsys.readouterr().err
