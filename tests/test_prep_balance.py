"""clip-prep balance (MetaCLIP's curation): word-boundary matching, head entries capped at about t
samples, tail entries kept whole, unmatched captions dropped, seeded and order-independent."""
from __future__ import annotations

import csv
import json
import math
import random

import pytest

from data_prep.balance import EntryMatcher, spaced
from data_prep.writer import TarShard, shard_name
from prep_fixtures import read_json, read_shards, run_cli

T = 100
# entry -> samples whose caption holds it; "quokka" shares 5 captions with "dog" (counted in both).
COUNTS = {"dog": 2000, "zebra": 800, "red fox": 200, "axolotl": 50, "quokka": 10}
SHARED = 5
UNMATCHED = 150
TEMPLATES = ("a photo of a {}.", "{} on the grass", "my {}, sleeping", "A {}! So cute", "two {}\tin a field")
# Entries inside longer words or with other capitals: they must not match.
DISTRACTORS = ("dogma", "catalog of zebras", "the Red Fox inn", "hotdog stand", "axolotls", "Dog")
JPEG = b"\xff\xd8 not really a picture \xff\xd9"  # balance reads captions only; the bytes must come back as they are


def captions() -> list[str]:
    rng = random.Random(0)
    texts = []
    for entry, count in COUNTS.items():
        alone = count - SHARED if entry in ("dog", "quokka") else count
        texts += [rng.choice(TEMPLATES).format(entry) for _ in range(alone)]
    texts += [f"a dog next to a quokka {i}" for i in range(SHARED)]
    texts += [f"{rng.choice(DISTRACTORS)} number {i}" for i in range(UNMATCHED)]
    rng.shuffle(texts)
    return texts


def write_samples(folder, pairs, per_shard: int) -> None:
    """(key, caption) samples as KEY.jpg/KEY.txt/KEY.json in tars, laid out as `clip-prep shard` does."""
    folder.mkdir(parents=True)
    sizes = {}
    for start in range(0, len(pairs), per_shard):
        shard = TarShard(folder / shard_name(len(sizes)))
        for key, text in pairs[start:start + per_shard]:
            shard.add(key, {"jpg": JPEG, "txt": text.encode(), "json": json.dumps({"key": key}).encode()})
        shard.close()
        sizes[shard.path.name] = len(pairs[start:start + per_shard])
    (folder / "sizes.json").write_text(json.dumps(sizes))
    (folder / "manifest.json").write_text(json.dumps({"tool": "clip-prep"}))


def write_input(folder, texts, per_shard: int = 500) -> list[str]:
    keys = [f"{i:012d}" for i in range(len(texts))]
    write_samples(folder, list(zip(keys, texts)), per_shard)
    return keys


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance")
    texts = captions()
    keys = write_input(root / "shards", texts)
    metadata = root / "metadata.txt"
    metadata.write_text("\n".join(list(COUNTS) + ["", "cat", "  "]) + "\n", encoding="utf-8")  # blank lines skipped
    return root, texts, keys, metadata


def balance(dataset, out, *extra) -> int:
    root, _, _, metadata = dataset
    return run_cli("balance", root / "shards", "--metadata", metadata, "--t", T, "--out", out, *extra)


def kept_texts(out) -> dict[str, str]:
    return {key: members["txt"].decode() for key, members in read_shards(out).items()}


def test_matching_follows_metaclips_spacing_rule():
    matcher = EntryMatcher(["cat", "hot dog", "St. Louis", "Apple"])

    def found(text):
        return [matcher.entries[i] for i in matcher.match(text)]

    assert found("a cat.") == ["cat"] and found("cat") == ["cat"] and found("Cat? cat!") == ["cat"]
    assert found("cat\tnap") == ["cat"] and found("one cat, two") == ["cat"]
    assert found("concatenate") == [] and found("cats") == [] and found("bobcat") == []
    assert found("CAT") == [] and found("apple pie") == []  # case-sensitive, as MetaCLIP
    assert found("cat's toy") == [] and found("(cat)") == []  # only blanks and , . ; : ? ! ` bound a word
    assert found("a hot dog; Apple") == ["hot dog", "Apple"] and found("hot dogs") == []
    assert found("St. Louis, MO") == ["St. Louis"]


def metaclip_reference(text: str, entries: list[str]) -> list[int]:
    """MetaCLIP's substr_matching as its paper describes it: ' entry ' in the spaced text."""
    padded = f" {text} "
    for mark in ",.;:?!`":
        padded = padded.replace(mark, f" {mark} ")
    for blank in "\t\n\r":
        padded = padded.replace(blank, " ")
    return [i for i, entry in enumerate(entries) if f" {entry} " in padded]


def test_matching_agrees_with_metaclip_on_random_text():
    rng = random.Random(1)
    alphabet = ["a", "b", "ab", "ba", " ", " ", ",", ".", "!", "'", "-", "\t", "\n", "A"]
    entries = ["a", "b", "ab", "a b", "ba ab", "A", "b-a", "a'b"]
    matcher = EntryMatcher(entries)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert list(matcher.match(text)) == metaclip_reference(text, entries), repr(text)
    assert spaced("a,b") == " a , b "


def test_head_entries_are_capped_and_the_tail_kept(dataset, tmp_path, capsys):
    _, texts, keys, _ = dataset
    out = tmp_path / "out"
    assert balance(dataset, out) == 0
    kept = kept_texts(out)
    counts = {row["entry"]: row for row in csv.DictReader(open(out / "entry_counts.tsv"), delimiter="\t")}
    assert {entry: int(row["count_before"]) for entry, row in counts.items()} == {**COUNTS, "cat": 0}
    after = {entry: sum(1 for text in kept.values() if metaclip_reference(text, [entry])) for entry in COUNTS}
    assert {entry: int(counts[entry]["count_after"]) for entry in COUNTS} == after
    for entry in ("zebra", "red fox"):  # one entry per caption: Binomial(count, t / count)
        p = T / COUNTS[entry]
        assert abs(after[entry] - T) <= 5 * math.sqrt(COUNTS[entry] * p * (1 - p)), entry
    # dog: its captions with quokka (a tail entry) are always kept, the others drawn with p = t / 5000.
    p = T / COUNTS["dog"]
    drawn = COUNTS["dog"] - SHARED
    assert abs(after["dog"] - SHARED - drawn * p) <= 5 * math.sqrt(drawn * p * (1 - p))
    assert after["axolotl"] == COUNTS["axolotl"] and after["quokka"] == COUNTS["quokka"]
    # Every kept sample is byte for byte an input; the dropped ones are in removed.jsonl with a reason.
    inputs, outputs = read_shards(dataset[0] / "shards"), read_shards(out)
    assert all(outputs[key] == inputs[key] for key in kept)
    assert list(kept) == [key for key in keys if key in kept]  # input order
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    by_key = dict(zip(keys, texts))
    unmatched = {r["key"] for r in removed if r["reason"] == "no_entry_matched"}
    assert unmatched == {key for key, text in by_key.items() if not metaclip_reference(text, list(COUNTS))}
    assert len(unmatched) == UNMATCHED and all(r["reason"] in ("no_entry_matched", "not_sampled") for r in removed)
    assert len(kept) + len(removed) == len(texts)
    check_stats(out, kept, after)
    assert "head share" in capsys.readouterr().out


def check_stats(out, kept, after):
    stats, manifest = read_json(out / "balance_stats.json"), read_json(out / "manifest.json")
    matched = sum(COUNTS.values()) - SHARED
    assert manifest["command"] == "balance" and manifest["kept"] == stats["kept_samples"] == len(kept)
    assert manifest["kept"] + manifest["removed"] == manifest["inputs"] == matched + UNMATCHED
    assert sum(read_json(out / "sizes.json").values()) == len(kept)
    assert (stats["entries"], stats["head_entries"], stats["tail_entries"], stats["unmatched_entries"]) == (6, 3, 2, 1)
    assert stats["matched_samples"] == matched
    tail = COUNTS["axolotl"] + COUNTS["quokka"]
    assert stats["samples_with_tail_entry"] == {"before": tail, "after": tail}
    assert stats["samples_head_only"] == {"before": matched - tail, "after": len(kept) - tail}
    assert stats["head_share"]["after"] < stats["head_share"]["before"]
    top = {row["entry"]: row for row in stats["top_entries"]}
    assert top["dog"]["count_before"] == COUNTS["dog"] and top["dog"]["count_after"] == after["dog"]
    assert top["dog"]["keep_probability"] == pytest.approx(T / COUNTS["dog"])


def test_seeded_and_independent_of_order(dataset, tmp_path):
    root, texts, keys, metadata = dataset
    same, other = tmp_path / "same", tmp_path / "other"
    first = tmp_path / "first"
    assert balance(dataset, first) == 0 and balance(dataset, same) == 0
    assert all((first / name).read_bytes() == (same / name).read_bytes()
               for name in ["removed.jsonl", "entry_counts.tsv", *read_json(first / "sizes.json")])
    assert balance(dataset, other, "--seed", 1) == 0
    assert set(kept_texts(other)) != set(kept_texts(first))
    # The same samples in reverse order, cut into other shards: the same ones are kept.
    reverse = tmp_path / "reversed"
    write_samples(reverse, list(zip(keys, texts))[::-1], per_shard=300)
    assert run_cli("balance", reverse, "--metadata", metadata, "--t", T, "--out", tmp_path / "out_rev") == 0
    assert set(kept_texts(tmp_path / "out_rev")) == set(kept_texts(first))


@pytest.mark.parametrize("case", ["missing_shards", "missing_metadata", "empty_metadata", "t_zero", "t_text"])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, case):
    shards, metadata, out = tmp_path / "shards", tmp_path / "metadata.txt", tmp_path / "out"
    if case != "missing_shards":
        write_input(shards, ["a dog"])
    if case != "missing_metadata":
        metadata.write_text("\n  \n\n" if case == "empty_metadata" else "dog\n", encoding="utf-8")
    t = {"t_zero": "0", "t_text": "many"}.get(case, "5")
    assert run_cli("balance", shards, "--metadata", metadata, "--t", t, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("clip-prep: error:") and err.count("\n") == 1, err
    assert not out.exists()
