"""clip-prep shard: sources (folder, CSV, TSV, JSONL), output layout and bad invocations."""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

try:  # tests/ is a rootdir-less folder today; keep working if it becomes a package
    from prep_fixtures import (jpeg_bytes, output_files, png_bytes, read_json, read_rejects, read_shards, run_cli,
                               write_pair)
except ImportError:
    from tests.prep_fixtures import (jpeg_bytes, output_files, png_bytes, read_json, read_rejects, read_shards,
                                     run_cli, write_pair)

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, count: int) -> list[Path]:
    """`count` captioned images spread over nested folders."""
    return [write_pair(root, f"part{i % 2}/img{i}.jpg", jpeg_bytes(seed=i), f"caption {i}") for i in range(count)]


def assert_one_error_line(capsys, *fragments: str) -> None:
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1, err_lines
    assert err_lines[0].startswith("clip-prep: error: ")
    for fragment in fragments:
        assert fragment in err_lines[0]


def test_folder_source_writes_img2dataset_layout(tmp_path):
    images = make_folder(tmp_path / "in", 5)
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "in", "--out", out, "--samples-per-shard", 2, "--workers", 1) == 0

    assert read_json(out / "sizes.json") == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    assert read_json(out / "00001_stats.json")["count"] == 2
    manifest = read_json(out / "manifest.json")
    assert (manifest["inputs"], manifest["written"], manifest["rejected"]) == (5, 5, 0)
    assert manifest["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
    assert manifest["options"]["samples_per_shard"] == 2 and manifest["tool"] == "clip-prep"
    assert (out / "rejects.jsonl").read_text() == ""

    samples = read_shards(out)
    # Sorted by relative path: part0/img0, part0/img2, part0/img4, part1/img1, part1/img3.
    expected_order = [images[i] for i in (0, 2, 4, 1, 3)]
    assert list(samples) == [f"{i:012d}" for i in range(5)]
    for key, image_path in zip(samples, expected_order):
        metadata = json.loads(samples[key]["json"])
        assert set(samples[key]) == {"jpg", "txt", "json"}
        assert metadata["source"] == str(image_path)
        assert metadata["sha256"] == hashlib.sha256(image_path.read_bytes()).hexdigest()
        assert samples[key]["txt"].decode() == image_path.with_suffix(".txt").read_text() == metadata["caption"]


def write_table(path: Path, delimiter: str, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as table:
        writer = csv.writer(table, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_table_source_resolves_paths_relative_to_the_table(tmp_path, monkeypatch, suffix, delimiter):
    data = tmp_path / "data"
    write_pair(data, "imgs/a.png", png_bytes(seed=1), None)
    absolute = write_pair(tmp_path / "elsewhere", "b.jpg", jpeg_bytes(seed=2), None)
    table = data / f"pairs{suffix}"
    rows = [["imgs/a.png", "first, with a comma", "x"], [str(absolute), "second", "y"], ["imgs/gone.jpg", "third", "z"]]
    write_table(table, delimiter, ["img", "text", "other"], rows)
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths must not depend on the cwd

    out = tmp_path / "out"
    assert run_cli("shard", table, "--out", out, "--path-column", "img", "--caption-column", "text", "--workers", 1) == 0

    samples = read_shards(out)
    assert [s["txt"].decode() for s in samples.values()] == ["first, with a comma", "second"]
    assert json.loads(samples["000000000000"]["json"])["source"] == "imgs/a.png"
    assert read_rejects(out) == [
        {"index": 2, "source": "imgs/gone.jpg", "reason": "missing_file", "detail": read_rejects(out)[0]["detail"]}
    ]


def test_jsonl_source_rejects_bad_lines_without_stopping(tmp_path):
    write_pair(tmp_path, "a.jpg", jpeg_bytes(), None)
    lines = [
        json.dumps({"filepath": "a.jpg", "caption": "good"}),
        "",  # blank lines are not records
        "{not json",
        json.dumps({"filepath": "a.jpg"}),
        json.dumps({"caption": "no path"}),
        json.dumps(["a", "list"]),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "pairs.jsonl", "--out", out, "--workers", 1) == 0

    assert list(read_shards(out)) == ["000000000000"]
    reasons = [(r["index"], r["reason"]) for r in read_rejects(out)]
    assert reasons == [(1, "invalid_record"), (2, "missing_caption"), (3, "missing_path"), (4, "invalid_record")]
    manifest = read_json(out / "manifest.json")
    assert manifest["written"] + manifest["rejected"] == manifest["inputs"] == 5


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_unknown_column_names_it_and_lists_present_columns(tmp_path, capsys, suffix):
    table = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        write_table(table, ",", ["path", "caption"], [["a.jpg", "x"]])
    else:
        table.write_text(json.dumps({"path": "a.jpg", "caption": "x"}) + "\n")
    assert run_cli("shard", table, "--out", tmp_path / "out") == 2
    assert_one_error_line(capsys, "'filepath'", "--path-column", "'path'", "'caption'")
    assert not (tmp_path / "out").exists()  # nothing is created for a bad invocation


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["shard", "{tmp}/nope", "--out", "{tmp}/out"], ["does not exist"]),
        (["shard", "{tmp}/pairs.xlsx", "--out", "{tmp}/out"], ["unsupported INPUT type"]),
        (["shard", "{tmp}/in", "--out", "{tmp}/out", "--image-size", "0"], ["--image-size", "between 1 and 16384, got 0"]),
        (["shard", "{tmp}/in", "--out", "{tmp}/out", "--resize-mode", "stretch"], ["--resize-mode"]),
        (["shard", "{tmp}/in", "--out", "{tmp}/out", "--modality", "video"], ["'video'", "image"]),
        (["shard", "{tmp}/in"], ["--out"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_bad_invocations_fail_with_one_line(tmp_path, capsys, argv, fragments):
    make_folder(tmp_path / "in", 1)
    (tmp_path / "pairs.xlsx").write_bytes(b"PK")
    assert run_cli(*[arg.format(tmp=tmp_path) for arg in argv]) == 2
    assert_one_error_line(capsys, *fragments)


def test_nonempty_output_needs_overwrite_which_removes_stale_shards(tmp_path, capsys):
    make_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "in", "--out", out, "--samples-per-shard", 1, "--workers", 1) == 0
    notes = out / "notes.md"
    notes.write_text("mine")
    capsys.readouterr()

    assert run_cli("shard", tmp_path / "in", "--out", out, "--workers", 1) == 2
    assert_one_error_line(capsys, "not empty", "--overwrite")

    assert run_cli("shard", tmp_path / "in", "--out", out, "--workers", 1, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]  # 00001/00002 from before are gone
    assert notes.read_text() == "mine"  # files clip-prep did not write are left alone


def test_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path):
    make_folder(tmp_path / "in", 2)
    out = tmp_path / "in" / "shards"
    assert run_cli("shard", tmp_path / "in", "--out", out, "--workers", 1) == 0
    assert run_cli("shard", tmp_path / "in", "--out", out, "--workers", 1, "--overwrite") == 0
    assert read_json(out / "manifest.json")["inputs"] == 2


def test_workers_do_not_change_the_output(tmp_path):
    make_folder(tmp_path / "in", 9)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert run_cli("shard", tmp_path / "in", "--out", out, "--workers", workers, "--samples-per-shard", 4) == 0
        outputs[workers] = output_files(out)
    assert list(outputs[1]) == list(outputs[2])
    assert outputs[1] == outputs[2]  # shards, parquets, stats (but their timing), sizes and rejects byte for byte


def test_console_entry_point_prints_no_traceback(tmp_path):
    env_path = {"PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "data_prep.cli", "shard", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env_path, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"clip-prep: error: INPUT {str(tmp_path / 'nope')!r} does not exist"]


def test_writer_refuses_to_finish_when_the_books_do_not_balance(tmp_path):
    from data_prep.samples import Rejection
    from data_prep.writer import DatasetWriter, InvariantError

    writer = DatasetWriter(tmp_path, samples_per_shard=10)
    writer.write(0, {"txt": b"a"}, {"source": "a"})
    writer.reject(1, "b", Rejection("empty_file", "zero bytes"))
    with pytest.raises(InvariantError, match=r"written \(1\) \+ rejected \(1\) != inputs \(3\)"):
        writer.finish(inputs=3, manifest_fields={})
    assert not (tmp_path / "manifest.json").exists()


def test_an_interrupted_run_leaves_no_manifest_even_over_a_finished_one(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert run_cli("shard", tmp_path / "in", "--out", out, "--workers", 1) == 0
    assert (out / "manifest.json").exists()

    from data_prep import pipeline

    original_process_item = pipeline.process_item

    def interrupted(item, encode, options, **download):
        if item.index == 2:
            raise KeyboardInterrupt
        return original_process_item(item, encode, options, **download)

    monkeypatch.setattr(pipeline, "process_item", interrupted)
    assert run_cli("shard", tmp_path / "in", "--out", out, "--workers", 1, "--overwrite") == 130
    assert not (out / "manifest.json").exists()
    assert not (out / "00000.tar").exists()  # only the .partial of an unfinished shard
    assert "incomplete" in capsys.readouterr().err
