"""The training loader: shard resolution, decode, skip counting, no unpickling, per-worker splits."""
import io
import json
import pickle

import pytest
import torch
import webdataset as wds
from PIL import Image

from clip_train.config import DataConfig
from clip_train.data import DataError, build_train_data, count_samples, expand_shards
from clip_train.models import build_model


class Boom:
    """Unpickling this creates a file: proof that a loader decoded a pickle member."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(root, shards, per_shard, bad=(), pickle_marker=None):
    """``bad``: global sample indices whose image bytes are garbage."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(shards):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(root / name)) as writer:
            for i in range(per_shard):
                index = s * per_shard + i
                sample = {"__key__": f"{index:09d}", "txt": f"caption {index}",
                          "jpg": b"not a jpeg" if index in bad else jpeg((index * 7 % 255, 10, 200))}
                if pickle_marker is not None:
                    sample["pyd"] = pickle.dumps(Boom(str(pickle_marker)))
                writer.write(sample)
        sizes[name] = per_shard
    (root / "sizes.json").write_text(json.dumps(sizes))
    return root


@pytest.fixture(scope="module")
def tiny():
    return build_model("demo-tiny", aug=False)


def data_cfg(path, **kw):
    return DataConfig(train=str(path), batch_size=4, workers=0, shuffle_buffer=10, **kw)


def test_expand_directory_pattern_and_union(tmp_path):
    write_shards(tmp_path / "a", 3, 2)
    write_shards(tmp_path / "b", 1, 2)
    urls = expand_shards(str(tmp_path / "a"))
    assert [u.rsplit("/", 1)[1] for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_shards(str(tmp_path / "a/{00000..00001}.tar")) == urls[:2]
    both = expand_shards(f"{tmp_path / 'a'}::{tmp_path / 'b/00000.tar'}")
    assert len(both) == 4 and count_samples(both) == 8


def test_expand_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="shard not found"):
        expand_shards(str(tmp_path / "x/{00000..00003}.tar"))
    with pytest.raises(DataError, match="no training shards"):
        expand_shards("")


def test_count_samples_unknown_without_sizes_json(tmp_path):
    write_shards(tmp_path, 1, 3)
    (tmp_path / "sizes.json").unlink()
    assert count_samples(expand_shards(str(tmp_path))) is None
    with pytest.raises(DataError, match="train_num_samples"):
        build_train_data(data_cfg(tmp_path), lambda im: im, lambda t: t, seed=0)


def test_batches_decode_skip_and_never_unpickle(tmp_path, tiny):
    marker = tmp_path / "unpickled"
    root = write_shards(tmp_path / "shards", 2, 9, bad={3, 12}, pickle_marker=marker)
    cfg = data_cfg(root)
    cfg.shuffle_buffer = 1  # keep shard order inside each shard, so both bad samples come before the last good one
    data = build_train_data(cfg, tiny.train_transform, tiny.tokenizer, seed=0)
    assert data.num_samples == 18 and data.batches_per_epoch == 4
    batches = list(data.epoch_batches(0))
    # 16 good samples make the epoch's 4 full batches; the 2 bad ones are counted, not fatal.
    assert len(batches) == 4
    assert all(b["image"].shape == (4, 3, 32, 32) and b["text"].shape == (4, 16) for b in batches)
    assert all(b["text"].dtype == torch.long for b in batches)
    assert sum(b["skipped"] for b in batches) == 2
    assert not marker.exists()


def test_epoch_has_the_same_number_of_batches_even_when_samples_are_bad(tmp_path, tiny):
    # open_clip's convention: an epoch is a fixed number of batches, wrapping around the shards,
    # so every rank and worker runs the same number of steps.
    root = write_shards(tmp_path, 1, 10, bad={0, 1, 2, 3})
    data = build_train_data(data_cfg(root), tiny.eval_transform, tiny.tokenizer, seed=0)
    assert data.batches_per_epoch == 2 and len(list(data.epoch_batches(0))) == 2


def test_epoch_reshuffles_deterministically(tmp_path, tiny):
    root = write_shards(tmp_path, 1, 12)
    tok = tiny.tokenizer

    def epochs():
        data = build_train_data(data_cfg(root), tiny.eval_transform, tok, seed=3)
        return [[b["text"][:, 2].tolist() for b in data.epoch_batches(epoch)] for epoch in range(2)]

    first, second = epochs(), epochs()
    assert first == second                  # same seed, same order
    assert first[0] != first[1]             # a new order each epoch


def test_too_few_shards_for_ranks(tmp_path, tiny):
    root = write_shards(tmp_path, 1, 8)
    with pytest.raises(DataError, match="cannot be split over 2 ranks"):
        build_train_data(data_cfg(root), tiny.train_transform, tiny.tokenizer, seed=0, rank=0, world_size=2)


def test_workers_read_disjoint_shards(tmp_path, tiny):
    root = write_shards(tmp_path, 2, 4)
    cfg = DataConfig(train=str(root), batch_size=2, workers=2, shuffle_buffer=1)
    data = build_train_data(cfg, tiny.eval_transform, tiny.tokenizer, seed=0)
    seen = [tuple(t[1:4].tolist()) for b in data.epoch_batches(0) for t in b["text"]]
    assert len(seen) == 8 and len(set(seen)) == 8  # every sample exactly once across both workers


@pytest.mark.parametrize("workers", [0, 1])
def test_fast_forward_gives_the_rest_of_the_same_epoch(tmp_path, tiny, workers):
    # A resumed run skips the batches it already trained on; what follows must be what an
    # uninterrupted run would have read, augmentation included (seeded by epoch and rank).
    root = write_shards(tmp_path, 1, 24)
    cfg = DataConfig(train=str(root), batch_size=4, workers=workers, shuffle_buffer=8)
    transform = tiny.train_transform if workers else tiny.eval_transform
    data = build_train_data(cfg, transform, tiny.tokenizer, seed=5)
    full = list(data.epoch_batches(2))
    rest = list(data.epoch_batches(2, skip=4))
    assert len(full) == 6 and len(rest) == 2
    for a, b in zip(full[4:], rest):
        assert torch.equal(a["text"], b["text"]) and torch.equal(a["image"], b["image"])
    assert not torch.equal(full[0]["text"], list(data.epoch_batches(3))[0]["text"])


def test_the_shuffle_releases_early_and_grows_its_buffer_to_full_size():
    import random

    from clip_train.data.stream import SHUFFLE_INITIAL, shuffled

    reads = []

    def source():
        for i in range(5000):
            reads.append(i)
            yield i

    stream = shuffled(source(), 2000, random.Random(0))
    first = next(stream)
    assert len(reads) == SHUFFLE_INITIAL  # not the 2,000 of a full buffer: an epoch starts at once
    released = [first] + [next(stream) for _ in range(1999)]
    assert len(reads) - len(released) == 1999  # two in per release until the buffer is full (then one)
    assert sorted(released + list(stream)) == list(range(5000))  # every sample exactly once
