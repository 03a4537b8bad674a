"""benchmarks/prep_throughput.py on a few images, our side only (img2dataset lives in its own venv and
is not installed for the tests): its generator, its tables, its loopback HTTP server and its checks
that every run wrote every image, for each input flavour."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prep_throughput.py"


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_our_side_writes_every_image_of_every_flavour(tmp_path):
    result = run_script("--images", 12, "--repeats", 1, "--samples-per-shard", 5, "--skip-img2dataset",
                        "--work", tmp_path / "work", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "images/s" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| file://", "| http://", "| local paths (img2dataset: its file:// runs)"]
    assert all(row.split(" | ")[1] == "-" for row in rows)  # no img2dataset figures without img2dataset
    for flavour in ("file", "http", "local"):  # every run is checked by the script; look at one output too
        stats = sorted((tmp_path / "work" / f"out_ours_{flavour}").glob("*_stats.json"))
        assert len(stats) == 3  # 12 inputs at 5 per shard
    images = sorted((tmp_path / "work" / "images").glob("*.jpg"))
    assert len(images) == 12 and len({path.stat().st_size for path in images}) == 12  # varied sizes


def test_a_missing_img2dataset_is_one_line(tmp_path):
    result = run_script("--images", 2, "--i2d-bin", tmp_path / "nowhere" / "img2dataset", "--work", tmp_path,
                        cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no img2dataset executable at" in result.stderr
