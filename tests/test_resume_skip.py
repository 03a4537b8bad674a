"""Resume without decoding: a resumed epoch drops the samples it already trained on as raw tar members,
and every random draw of a sample comes from (seed, epoch, shard, key), so what follows is exactly what
an uninterrupted run reads. Also weighted mixing of sources (open_clip's upsampling factors)."""
import collections
import io
import json
import multiprocessing

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from clip_train.config import ConfigError, DataConfig, load_config
from clip_train.data import DataError, build_train_data
from clip_train.data.loader import SampleDecoder
from clip_train.data.shards import expand_weighted_shards
from clip_train.data.stream import StreamPlan, role_shards
from clip_train.models import build_model


def noise_jpeg(index):
    """Different pixels everywhere, so two different random crops give different tensors."""
    pixels = np.random.RandomState(index).randint(0, 255, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(root, shards, per_shard, bad=(), prefix=""):
    root.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(shards):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(root / name)) as writer:
            for i in range(per_shard):
                index = s * per_shard + i
                writer.write({"__key__": f"{prefix}{index:09d}", "txt": f"{prefix}caption {index}\n{prefix}photo {index}",
                              "jpg": b"not a jpeg" if index in bad else noise_jpeg(index)})
        sizes[name] = per_shard
    (root / "sizes.json").write_text(json.dumps(sizes))
    return root


@pytest.fixture(scope="module")
def tiny():
    return build_model("demo-tiny", aug=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # Two bad samples: a resume from the batches' recorded positions must account for them.
    return write_shards(tmp_path_factory.mktemp("shards"), 8, 15, bad={3, 61})


def train_data(root, tiny, *, workers, rank=0, world_size=1, **kw):
    cfg = DataConfig(train=str(root), batch_size=4, workers=workers, shuffle_buffer=12, **kw)
    return build_train_data(cfg, tiny.train_transform, tiny.tokenizer, seed=3, rank=rank, world_size=world_size,
                            views=frozenset({"text_views"}))


def positions(batches):
    """What the trainer records: each role's raw position after its latest batch."""
    return dict(tuple(b["position"]) for b in batches)


def assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a.keys() - {"skipped"} == b.keys() - {"skipped"}
        for name in a.keys() - {"skipped", "position"}:
            assert torch.equal(a[name], b[name]), name
        assert list(a["position"]) == list(b["position"])


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_resumed_epoch_is_the_rest_of_the_uninterrupted_one(shards, tiny, workers, rank, world_size):
    data = train_data(shards, tiny, workers=workers, rank=rank, world_size=world_size)
    full = list(data.epoch_batches(1))
    assert len(full) == data.batches_per_epoch
    for skip in (1, len(full) // 2, len(full) - 1, len(full)):  # the last one: a checkpoint at the epoch's end
        rest = list(data.epoch_batches(1, skip=skip, consumed=positions(full[:skip])))
        assert_same_batches(full[skip:], rest)


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_workers_persist_across_epochs_and_resume_stays_exact(shards, tiny, workers):
    before = set(multiprocessing.active_children())
    data = train_data(shards, tiny, workers=workers)
    epochs, worker_pids = [], []
    for epoch in range(3):
        epochs.append(list(data.epoch_batches(epoch)))
        worker_pids.append(sorted(p.pid for p in set(multiprocessing.active_children()) - before))
    assert len(worker_pids[0]) == workers and worker_pids[0] == worker_pids[1] == worker_pids[2]
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(epochs[0], epochs[1]))  # a new epoch's draws

    resumed = train_data(shards, tiny, workers=workers)  # a new process resumes in the middle of epoch 1
    skip = len(epochs[1]) // 2 + 1
    assert_same_batches(epochs[1][skip:], list(resumed.epoch_batches(1, skip=skip, consumed=positions(epochs[1][:skip]))))
    assert_same_batches(epochs[2], list(resumed.epoch_batches(2)))  # then its persistent workers go on alike


def test_without_recorded_positions_each_role_skips_full_batches(tmp_path, tiny):
    root = write_shards(tmp_path, 4, 12)  # no bad samples: full batches are the exact count
    data = train_data(root, tiny, workers=2)
    full = list(data.epoch_batches(0))
    assert_same_batches(full[5:], list(data.epoch_batches(0, skip=5)))


def test_augmentation_depends_on_the_sample_not_on_what_came_before(shards, tiny):
    data = train_data(shards, tiny, workers=0)
    keys_seen_with = {}
    for epoch in (0, 1):
        for batch in data.epoch_batches(epoch):
            for text, image in zip(batch["text"], batch["image"]):
                keys_seen_with.setdefault(epoch, []).append((tuple(text.tolist()), image))
    # Another epoch draws other crops of the same samples (the seed includes the epoch).
    first = {t: img for t, img in keys_seen_with[0]}
    assert any(not torch.equal(first[t], img) for t, img in keys_seen_with[1] if t in first)


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_skipped_samples_are_never_decoded(tmp_path, tiny, monkeypatch, fraction):
    root = write_shards(tmp_path, 4, 25)
    data = train_data(root, tiny, workers=0)
    decoded = []
    original = SampleDecoder._decode
    monkeypatch.setattr(SampleDecoder, "_decode", lambda self, *a: decoded.append(1) or original(self, *a))
    skip = int(fraction * data.batches_per_epoch)
    batches = data.epoch_batches(0, skip=skip)
    next(batches)
    assert len(decoded) == data.cfg.batch_size  # the resumed batch, nothing before it


def test_checkpoint_at_the_end_of_an_epoch_reads_nothing(shards, tiny, monkeypatch):
    data = train_data(shards, tiny, workers=2)
    monkeypatch.setattr("torch.utils.data.DataLoader", None)  # building a loader would fail
    assert list(data.epoch_batches(0, skip=data.batches_per_epoch)) == []


# --- weighted sources --------------------------------------------------------------------------


def plan(urls, weights):
    return StreamPlan(tuple(urls), tuple(weights), True, epoch_seed=1, rank=0, world_size=1, roles=1,
                      role_offset=0, consumed=(0,), batches=(1,), shuffle_buffer=1)


def test_shards_are_drawn_with_their_sources_weights():
    # Source a: 2 shards at weight 1; source b: 3 shards at weight 4. As in open_clip, a shard's weight
    # is its source's, so P(b) = 3*4 / (2*1 + 3*4).
    urls = ["a0", "a1", "b0", "b1", "b2"]
    draws = [urls[i][0] for (i, _), _ in zip(role_shards(plan(urls, [1, 1, 4, 4, 4]), 0), range(20000))]
    share_b = draws.count("b") / len(draws)
    assert share_b == pytest.approx(12 / 14, abs=0.01)


def test_weighted_loader_mix_matches_the_weights(tmp_path, tiny):
    a = write_shards(tmp_path / "a", 2, 2, prefix="alpha ")
    b = write_shards(tmp_path / "b", 2, 2, prefix="bravo ")
    cfg = DataConfig(train=f"{a}::{b}", train_weights="1,3", resampled=True, train_num_samples=1600, batch_size=16,
                     workers=0, shuffle_buffer=4)
    data = build_train_data(cfg, tiny.eval_transform, tiny.tokenizer, seed=0)
    first_tokens = collections.Counter()
    for batch in data.epoch_batches(0):
        first_tokens.update(batch["text"][:, 1].tolist())  # the token of "alpha" or "bravo"
    token_a, token_b = (int(tiny.tokenizer([word])[0, 1]) for word in ("alpha", "bravo"))
    share_b = first_tokens[token_b] / (first_tokens[token_a] + first_tokens[token_b])
    assert share_b == pytest.approx(0.75, abs=0.05)  # 800 shard draws: sd 0.015
    # and the resampled stream resumes exactly too
    full = list(data.epoch_batches(0))
    assert_same_batches(full[60:], list(data.epoch_batches(0, skip=60, consumed=positions(full[:60]))))


def test_weights_from_a_yaml_list_of_sources(tmp_path):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("data:\n  resampled: true\n  train_num_samples: 100\n"
                      "  train:\n    - {path: '/a/{000..009}.tar', weight: 1}\n    - {path: '/b/{000..049}.tar', weight: 4}\n")
    cfg = load_config(recipe)
    assert (cfg.data.train, cfg.data.train_weights) == ("/a/{000..009}.tar::/b/{000..049}.tar", "1,4")


def test_weight_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.resampled=true"):
        load_config(None, ["data.train=/a.tar::/b.tar", "data.train_weights=1,4"])
    root = write_shards(tmp_path, 1, 1)
    with pytest.raises(DataError, match="1 weight.* for 2 source"):
        expand_weighted_shards(f"{root}::{root}", "1")
    with pytest.raises(DataError, match="at least one positive"):
        expand_weighted_shards(f"{root}::{root}", "0,0")
    with pytest.raises(DataError, match="expected numbers"):
        expand_weighted_shards(f"{root}::{root}", "1,x")
    urls, weights = expand_weighted_shards(f"{root}::{root}", "1::2.5")
    assert weights == [1.0, 2.5] and len(urls) == 2
