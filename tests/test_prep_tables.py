"""clip-prep shard over tables as LAION and DataComp ship them: Parquet (read in batches), and
gzipped CSV/TSV/JSONL, with --save-additional-columns copied into each sample's KEY.json."""
from __future__ import annotations

import datetime
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prep_fixtures import jpeg_bytes, read_json, read_rejects, read_shards, run_cli, write_pair

ROWS = 7


def make_images(folder):
    """ROWS images; the row of index 3 names a file that does not exist."""
    paths = [str(write_pair(folder, f"img{i}.jpg", jpeg_bytes(seed=i), None).relative_to(folder)) for i in range(ROWS)]
    paths[3] = "missing.jpg"
    return paths


def columns(paths):
    return {"url": paths, "caption": [f"caption {i}" for i in range(ROWS)],
            "similarity": [0.25 + i / 100 for i in range(ROWS)], "NSFW": ["UNLIKELY"] * ROWS,
            "taken": [datetime.datetime(2020, 1, 1 + i) for i in range(ROWS)], "unused": list(range(ROWS))}


def check_output(out, paths):
    samples = read_shards(out)
    kept = [i for i in range(ROWS) if i != 3]
    assert [s["txt"].decode() for s in samples.values()] == [f"caption {i}" for i in kept]
    for i, sample in zip(kept, samples.values()):
        meta = json.loads(sample["json"])
        assert meta["source"] == paths[i] and float(meta["similarity"]) == pytest.approx(0.25 + i / 100)  # CSV cells stay text
        assert meta["NSFW"] == "UNLIKELY" and "unused" not in meta
    assert [(r["index"], r["reason"]) for r in read_rejects(out)] == [(3, "missing_file")]
    assert read_json(out / "manifest.json")["written"] == ROWS - 1


def test_parquet_streams_in_batches_and_keeps_additional_columns(tmp_path, monkeypatch):
    import data_prep.sources as sources

    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 2)  # several batches: order and indices must carry over
    paths = make_images(tmp_path)
    pq.write_table(pa.table(columns(paths)), tmp_path / "pairs.parquet", row_group_size=3)
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "pairs.parquet", "--out", out, "--path-column", "url", "--workers", 1,
                   "--save-additional-columns", "similarity,NSFW,taken") == 0
    check_output(out, paths)
    first = json.loads(next(iter(read_shards(out).values()))["json"])
    assert first["taken"] == "2020-01-01 00:00:00"  # a timestamp is kept as its text


@pytest.mark.parametrize("name", ["pairs.csv.gz", "pairs.tsv.gz", "pairs.jsonl.gz"])
def test_gzipped_tables(tmp_path, name):
    paths = make_images(tmp_path)
    table = columns(paths)
    keys = ["url", "caption", "similarity", "NSFW"]
    if name.endswith(".jsonl.gz"):
        text = "".join(json.dumps({k: table[k][i] for k in keys}) + "\n" for i in range(ROWS))
    else:
        sep = "," if ".csv" in name else "\t"
        text = sep.join(keys) + "\n" + "".join(sep.join(str(table[k][i]) for k in keys) + "\n" for i in range(ROWS))
    with gzip.open(tmp_path / name, "wt", encoding="utf-8") as handle:
        handle.write(text)
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / name, "--out", out, "--path-column", "url", "--workers", 1,
                   "--save-additional-columns", "similarity,NSFW") == 0
    check_output(out, paths)


def test_a_missing_additional_column_is_one_line_before_any_output(tmp_path, capsys):
    paths = make_images(tmp_path)
    pq.write_table(pa.table(columns(paths)), tmp_path / "pairs.parquet")
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "pairs.parquet", "--out", out, "--path-column", "url",
                   "--save-additional-columns", "similarity,LICENSE") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'LICENSE' (from --save-additional-columns) not found" in err
    assert not out.exists()


def test_a_corrupt_gzip_or_parquet_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip at all")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    for name in ("bad.csv.gz", "bad.parquet"):
        assert run_cli("shard", tmp_path / name, "--out", tmp_path / "out") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("clip-prep: error: cannot read"), err


def test_datacomp_basic_filters_reject_with_reasons(tmp_path):
    from prep_fixtures import noise_image, image_bytes

    sizes = {"ok": (64, 48), "small": (30, 64), "long": (200, 40), "terse": (64, 64)}
    rows = []
    for name, (w, h) in sizes.items():
        write_pair(tmp_path, f"{name}.png", image_bytes(noise_image(w, h), "PNG"), None)
        rows.append({"filepath": f"{name}.png", "caption": "two words" if name == "terse" else "a longer caption here"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "pairs.jsonl", "--out", out, "--workers", 1, "--min-words", 3,
                   "--min-side", 32, "--max-aspect", 3) == 0
    assert [json.loads(s["json"])["source"] for s in read_shards(out).values()] == ["ok.png"]
    assert {r["source"]: r["reason"] for r in read_rejects(out)} == {
        "small.png": "too_small", "long.png": "too_elongated", "terse.png": "too_few_words"}


def test_an_aspect_ratio_under_one_is_a_usage_error(tmp_path, capsys):
    assert run_cli("shard", tmp_path, "--out", tmp_path / "out", "--max-aspect", "0.5") == 2
    assert "at least 1" in capsys.readouterr().err


def test_shards_cover_fixed_input_ranges_with_img2dataset_stats_and_parquets(tmp_path):
    """Shard N holds inputs [4N, 4N+4) whatever failed: a range with nothing written has stats
    and a parquet but no tar; every input has a parquet row with its status."""
    images = {i: jpeg_bytes(seed=i) for i in range(10)}
    for i in (4, 5, 6, 7):
        images[i] = b"not an image"
    rows = [{"filepath": str(write_pair(tmp_path, f"img{i}.jpg", data, None)), "caption": f"caption {i}",
             "rank": i} for i, data in images.items()]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "pairs.jsonl", "--out", out, "--samples-per-shard", 4, "--workers", 1,
                   "--save-additional-columns", "rank") == 0

    assert read_json(out / "sizes.json") == {"00000.tar": 4, "00002.tar": 2}
    assert not (out / "00001.tar").exists()
    stats = read_json(out / "00001_stats.json")
    assert {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize", "status_dict")} == {
        "count": 4, "successes": 0, "failed_to_download": 0, "failed_to_resize": 4,
        "status_dict": {"success": 0, "not_an_image": 4}}
    assert stats["duration"] >= 0 and stats["end_time"] >= stats["start_time"]
    assert read_json(out / "00002_stats.json")["count"] == 2

    table = pq.read_table(out / "00000.parquet").to_pylist() + pq.read_table(out / "00001.parquet").to_pylist()
    assert [row["key"] for row in table] == [f"{i:012d}" for i in range(8)]
    assert [row["status"] for row in table] == ["success"] * 4 + ["failed_to_resize"] * 4
    import hashlib
    assert [row["sha256"] for row in table[:4]] == [hashlib.sha256(images[i]).hexdigest() for i in range(4)]
    assert {row["reason"] for row in table[4:]} == {"not_an_image"} and all(row["error_message"] for row in table[4:])
    assert [row["caption"] for row in table] == [f"caption {i}" for i in range(8)]
    assert [row["rank"] for row in table] == [str(i) for i in range(8)]  # additional columns as text
    assert [(row["width"], row["height"]) for row in table[:4]] == [(24, 16)] * 4
    assert [r["index"] for r in read_rejects(out)] == [4, 5, 6, 7]
