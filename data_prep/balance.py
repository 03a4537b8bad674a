"""`clip-prep balance`: MetaCLIP's curation (Xu et al., "Demystifying CLIP Data", 2023) of a
clip-prep folder against a list of metadata entries.

1. Match: the entries found in each caption, by substring matching on word boundaries.
   As MetaCLIP does it, the caption is padded with a space at both ends, the punctuation
   , . ; : ? ! ` gets a space on each side and tabs/newlines become spaces; an entry matches
   where " entry " occurs in that text. So an entry matches only between whitespace, those
   punctuation marks or the caption's ends: "cat" is found in "a cat." but not in "concatenate",
   "cats" or "cat's". Matching is case-sensitive, as in MetaCLIP (whose metadata holds both
   "apple" and "Apple"). One Aho-Corasick automaton (pyahocorasick) finds all entries in one pass.
   Entries are spaced the same way as captions (MetaCLIP only pads them): for an entry without
   those punctuation marks it is the same thing, and an entry such as "St. Louis" can match.
2. Count: count[e] = how many samples match entry e (once per sample).
3. Sample: a sample is kept when any of its entries is drawn, entry e with probability
   t / max(count[e], t): entries with count <= t (the tail) keep all their samples, a head entry
   keeps about t. A sample that matches no entry is dropped, as in MetaCLIP.

The draws do not come from one random stream: the uniform for (sample, entry) is a hash of
(seed, key, entry), so the kept set depends on the seed and the data only, not on the order or
the grouping in which samples are visited (a rerun on re-cut shards keeps the same samples).
"""
from __future__ import annotations

import csv
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.curation import (CurationOutput, CurationSummary, input_shards, iter_samples,
                                note_unfinished_input, prepare_curation_output)
from data_prep.sources import SourceError
from data_prep.writer import write_json_atomically

STATS_FILE = "balance_stats.json"
COUNTS_FILE = "entry_counts.tsv"
TOP_ENTRIES = 20  # entries listed in balance_stats.json (entry_counts.tsv has all)
PRINTED_ENTRIES = 10
# MetaCLIP's spacing: these punctuation marks get a space on each side, these blanks become a space.
_SPACING = str.maketrans({**{mark: f" {mark} " for mark in ",.;:?!`"}, **{blank: " " for blank in "\t\n\r"}})


def spaced(text: str) -> str:
    """The text as MetaCLIP matches it: padded, punctuation set apart, blanks as spaces."""
    return f" {text} ".translate(_SPACING)


def read_metadata(path: Path) -> tuple[list[str], int]:
    """Entries of a metadata file, one a line, stripped, blank lines skipped; also how many lines
    repeated an earlier entry (as MetaCLIP matches them) and were left out."""
    if not path.is_file():
        raise SourceError(f"--metadata {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SourceError(f"--metadata {str(path)!r} is not UTF-8 text ({error})") from None
    entries, patterns, repeated = [], set(), 0
    for line in text.split("\n"):
        entry = line.strip()
        if not entry:
            continue
        if spaced(entry) in patterns:
            repeated += 1
            continue
        patterns.add(spaced(entry))
        entries.append(entry)
    if not entries:
        raise SourceError(f"--metadata {str(path)!r} holds no entries")
    return entries, repeated


class EntryMatcher:
    """All entries found in a caption, as sorted entry indices."""

    def __init__(self, entries: list[str]):
        import ahocorasick

        self.entries = entries
        self._automaton = ahocorasick.Automaton()
        for index, entry in enumerate(entries):
            self._automaton.add_word(spaced(entry), index)
        self._automaton.make_automaton()

    def match(self, caption: str) -> tuple[int, ...]:
        return tuple(sorted({index for _, index in self._automaton.iter(spaced(caption))}))


def keep_probability(count: int, t: int) -> float:
    return t / max(count, t)


def uniform(seed: int, key: str, entry: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, sample key, entry): 53 bits of a blake2b digest."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{entry}".encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def is_kept(key: str, matched: tuple[int, ...], entries: list[str], counts: list[int], t: int, seed: int) -> bool:
    if any(counts[index] <= t for index in matched):  # a tail entry keeps all its samples
        return True
    return any(uniform(seed, key, entries[index]) < keep_probability(counts[index], t) for index in matched)


@dataclass
class BalanceTally:
    """What pass 1 found and pass 2 kept."""
    entries: list[str]
    t: int
    keys: list[str] = field(default_factory=list)  # in input order, to check that pass 2 reads the same
    matches: list[tuple[int, ...]] = field(default_factory=list)  # entry indices of each sample
    counts: list[int] = field(init=False)  # samples per entry, in the input
    counts_after: list[int] = field(init=False)  # kept samples per entry

    def __post_init__(self):
        self.counts = [0] * len(self.entries)
        self.counts_after = [0] * len(self.entries)

    def has_tail_entry(self, matched: tuple[int, ...]) -> bool:
        return any(self.counts[index] <= self.t for index in matched)


def count_entries(shards, matcher: EntryMatcher, tally: BalanceTally) -> None:
    """Pass 1: the entries of every sample, and each entry's sample count."""
    for sample in iter_samples(shards):
        caption = sample.caption()
        matched = matcher.match(caption) if caption is not None else ()
        tally.keys.append(sample.key)
        tally.matches.append(matched)
        for index in matched:
            tally.counts[index] += 1


def write_balanced(shards, tally: BalanceTally, seed: int, output: CurationOutput) -> None:
    """Pass 2: copy the kept samples, record the dropped ones."""
    position = -1
    for position, sample in enumerate(iter_samples(shards)):
        if position >= len(tally.keys) or sample.key != tally.keys[position]:
            raise SourceError("SHARDS changed while balance was reading it; run it again")
        matched = tally.matches[position]
        if not matched:
            output.remove(sample, "no_entry_matched" if sample.caption() is not None else "no_caption")
        elif is_kept(sample.key, matched, tally.entries, tally.counts, tally.t, seed):
            output.keep(sample)
            for index in matched:
                tally.counts_after[index] += 1
        else:
            output.remove(sample, "not_sampled", entries=[tally.entries[index] for index in matched])
    if position + 1 != len(tally.keys):
        raise SourceError("SHARDS changed while balance was reading it; run it again")


def balance_stats(tally: BalanceTally, summary: CurationSummary, seed: int) -> dict[str, Any]:
    t, counts, after = tally.t, tally.counts, tally.counts_after
    matched = [m for m in tally.matches if m]
    with_tail = sum(tally.has_tail_entry(m) for m in matched)
    head_only_before = len(matched) - with_tail
    head_only_after = summary.kept - with_tail  # every sample with a tail entry is kept

    def share(part: int, whole: int) -> float:
        return round(part / whole, 6) if whole else 0.0

    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:TOP_ENTRIES]
    return {
        "t": t, "seed": seed, "entries": len(tally.entries),
        "head_entries": sum(c > t for c in counts), "tail_entries": sum(0 < c <= t for c in counts),
        "unmatched_entries": sum(c == 0 for c in counts),
        "inputs": summary.inputs, "matched_samples": len(matched), "kept_samples": summary.kept,
        "removed_by_reason": summary.removed_by_reason,
        "entry_matches": {"before": sum(counts), "after": sum(after)},
        # A sample "from the head" matches head entries only; one with a tail entry is always kept.
        "samples_head_only": {"before": head_only_before, "after": head_only_after},
        "samples_with_tail_entry": {"before": with_tail, "after": with_tail},
        "head_share": {"before": share(head_only_before, len(matched)), "after": share(head_only_after, summary.kept)},
        "tail_share": {"before": share(with_tail, len(matched)), "after": share(with_tail, summary.kept)},
        "top_entries": [{"entry": tally.entries[i], "count_before": counts[i], "count_after": after[i],
                         "keep_probability": round(keep_probability(counts[i], t), 6)} for i in order],
    }


def write_entry_counts(path: Path, tally: BalanceTally) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(("entry", "count_before", "count_after"))
        writer.writerows(zip(tally.entries, tally.counts, tally.counts_after))


def run_balance(source: Path, out_dir: Path, metadata: Path, t: int, seed: int, samples_per_shard: int,
                overwrite: bool, options: dict[str, Any]) -> CurationSummary:
    shards = input_shards(source)  # SHARDS and --metadata are checked before --out is touched
    entries, repeated = read_metadata(metadata)
    if repeated:
        print(f"clip-prep balance: note: {repeated} line(s) of {metadata} repeat an earlier entry; counted once",
              file=sys.stderr)
    note_unfinished_input(source, "balance")
    prepare_curation_output(source, out_dir, overwrite)
    matcher, tally = EntryMatcher(entries), BalanceTally(entries, t)
    count_entries(shards, matcher, tally)
    output = CurationOutput(out_dir, samples_per_shard)
    write_balanced(shards, tally, seed, output)
    output.close_data()
    stats = balance_stats(tally, output.summary("balance", len(tally.keys)), seed)
    write_json_atomically(out_dir / STATS_FILE, stats)
    write_entry_counts(out_dir / COUNTS_FILE, tally)
    fields = {"metadata": str(metadata.resolve()), "metadata_entries": len(entries), "t": t, "seed": seed,
              "matched_samples": stats["matched_samples"], "stats_file": STATS_FILE, "counts_file": COUNTS_FILE,
              "options": options}
    summary = output.finish("balance", source, len(tally.keys), fields)
    print_balance_report(stats)
    print(summary.one_line())
    return summary


def print_balance_report(stats: dict[str, Any]) -> None:
    t = stats["t"]
    print(f"  t={t}: {stats['entries']} entries ({stats['head_entries']} head: count > t, "
          f"{stats['tail_entries']} tail, {stats['unmatched_entries']} unmatched)")
    head, tail, share = stats["samples_head_only"], stats["samples_with_tail_entry"], stats["head_share"]
    rows = [("samples", "before", "after"), ("matched / kept", stats["matched_samples"], stats["kept_samples"]),
            ("head entries only", head["before"], head["after"]), ("with a tail entry", tail["before"], tail["after"]),
            ("head share", f"{share['before']:.1%}", f"{share['after']:.1%}")]
    for name, before, after in rows:
        print(f"  {name:<18} {before:>10} {after:>10}")
    top = stats["top_entries"][:PRINTED_ENTRIES]
    if top:
        width = max(12, *(len(row["entry"]) for row in top))
        print(f"  {'entry':<{width}} {'before':>10} {'after':>10} {'p_keep':>8}")
        for row in top:
            print(f"  {row['entry']:<{width}} {row['count_before']:>10} {row['count_after']:>10} "
                  f"{row['keep_probability']:>8.4f}")
