"""The folder source walks lazily, one folder listing at a time, in sorted relative-path order."""
from __future__ import annotations

import os
import random
from pathlib import Path

from data_prep import sources
from data_prep.sources import SourceSpec, folder_source, list_folder_files

# Names whose order a per-folder sort by name alone would get wrong ("a.txt" < "a/x", "a-b/" < "a.k/").
TRICKY = ["a.jpg", "a.k/x.jpg", "a.txt", "a/b.jpg", "a-b/c.png", "ab/d.jpg", "Z.jpg", "a/ä.jpg", "a/b/c/d.txt",
          "a b/e.jpg", "a/b.txt"]


def make_tree(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)


def global_sort(root: Path) -> list[Path]:
    """What the folder source read before it was lazy: every file, sorted by relative path."""
    found = [Path(folder) / name for folder, _, files in os.walk(root) for name in files]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def random_names(rng: random.Random, count: int) -> list[str]:
    alphabet = "ab.-_ Z0"
    names = set()
    while len(names) < count:
        parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        names.add("/".join(parts[:-1] + [parts[-1] + rng.choice([".jpg", ".txt", ".png"])]))
    return sorted(names)


def test_walk_order_equals_a_global_sort_of_relative_paths(tmp_path):
    make_tree(tmp_path / "tricky", TRICKY)
    assert list_folder_files(tmp_path / "tricky", None) == global_sort(tmp_path / "tricky")
    for seed in range(5):
        root = tmp_path / f"random{seed}"
        root.mkdir()
        names = random_names(random.Random(seed), 60)
        for name in names:  # a name can be both a file and a folder prefix: keep whichever came first
            try:
                make_tree(root, [name])
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                pass
        assert list_folder_files(root, None) == global_sort(root)


def test_captions_pair_with_their_media_across_interleaved_subfolders(tmp_path):
    make_tree(tmp_path, TRICKY)
    items = list(folder_source(SourceSpec(input=tmp_path)))
    by_key = {Path(item.source).relative_to(tmp_path).as_posix(): item for item in items}
    assert by_key["a.jpg"].caption == "a.txt"  # "a.k/" sorts between a.jpg and a.txt
    assert by_key["a/b.jpg"].caption == "a/b.txt"
    assert by_key["a/b/c/d.txt"].rejection.reason == "missing_image"  # a caption with no media is an input
    assert "a.txt" not in by_key and "a/b.txt" not in by_key
    assert [item.index for item in items] == list(range(len(items)))


def test_the_first_input_comes_before_the_other_folders_are_listed(tmp_path, monkeypatch):
    for part in range(20):
        make_tree(tmp_path, [f"part{part:02d}/img{i}.jpg" for i in range(3)])
    listed = []
    real_scandir = os.scandir
    monkeypatch.setattr(sources.os, "scandir", lambda path: listed.append(Path(path)) or real_scandir(path))
    first = next(iter(folder_source(SourceSpec(input=tmp_path))))
    assert Path(first.source) == tmp_path / "part00" / "img0.jpg"
    assert listed == [tmp_path, tmp_path / "part00"]


def test_symlinked_folders_are_not_followed_as_os_walk_does(tmp_path):
    make_tree(tmp_path / "in", ["real/x.jpg"])
    (tmp_path / "in" / "link").symlink_to(tmp_path / "in" / "real", target_is_directory=True)
    assert list_folder_files(tmp_path / "in", None) == [tmp_path / "in" / "real" / "x.jpg"]
