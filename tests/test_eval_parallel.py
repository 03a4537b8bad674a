"""In-training evaluation over several ranks (real gloo processes) and under a bf16 model.

The ranks' metrics must equal the single-process ones, every rank must return the same dict, and
each rank must decode only its share of the samples. Each rank process builds the tiny model once
and runs every case, so that the process start-up is paid once per world size.
"""
import hashlib
import io
import multiprocessing
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from dist_harness import run_workers

from clip_train.eval import EvalError, run_training_eval
from clip_train.eval.datasets import open_classification_set, open_retrieval_set, resolve_classification_set
from clip_train.eval.multilabel import open_multilabel_set
from clip_train.eval.sharding import Share
from clip_train.models import build_model

BATCH = 32
TOLERANCE = 1e-6
# Per case: the keyword arguments of run_training_eval that name its data sets.
CASES = {
    "demo": lambda d: {"zeroshot_path": d["test"], "retrieval_path": d["retrieval"], "multilabel_path": d["test"]},
    "two_shards": lambda d: {"zeroshot_path": d["two_shards"]},  # 181 + 179 samples: uneven split
    "tiny": lambda d: {"retrieval_path": d["tiny"]},  # 2 samples: a third rank gets none
    "folder": lambda d: {"zeroshot_path": d["folder"]},  # an image folder (map-style dataset), 20 images
}


def _tiny_model():
    torch.manual_seed(0)
    built = build_model("demo-tiny")
    return built.model, built.eval_transform, built.tokenizer


# --- data sets derived from the demo output ----------------------------------------------------


def _samples(tar_path: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    """The tar's (member, bytes) pairs grouped by sample key, in file order."""
    groups: dict[str, list] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            groups.setdefault(member.name.split(".", 1)[0], []).append((member, tar.extractfile(member).read()))
    return groups


def _write_shard(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))


def _classification_dir(path: Path, demo_test: Path, shards: list) -> Path:
    """A classification shard directory: `shards` (lists of samples) beside the demo's class names."""
    path.mkdir()
    for i, samples in enumerate(shards):
        _write_shard(path / f"{i:05d}.tar", samples)
    for name in ("classnames.txt", "templates.txt"):
        (path / name).write_text((demo_test / name).read_text())
    return path


def _image_folder(path: Path, demo_test: Path, samples) -> Path:
    """An ImageFolder layout (one sub-folder per class) of the samples' images."""
    classnames = (demo_test / "classnames.txt").read_text().splitlines()
    for i, members in enumerate(samples):
        media = {m.name.rsplit(".", 1)[1]: data for m, data in members}
        class_dir = path / classnames[int(media["cls"])].replace(" ", "_")
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"{i:03d}.jpg").write_bytes(media["jpg"])
    return path


@pytest.fixture(scope="module")
def datasets(demo_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_parallel")
    demo_test = demo_dataset / "test"
    test_samples = list(_samples(demo_test / "00000.tar").values())
    tiny = root / "tiny"
    tiny.mkdir()
    _write_shard(tiny / "00000.tar", list(_samples(demo_dataset / "retrieval" / "00000.tar").values())[:2])
    # sample 1 (rank 1's of 2) has a class that is not an integer
    corrupt = test_samples[:4]
    corrupt[1] = [(m, b"not a class") if m.name.endswith(".cls") else (m, data) for m, data in corrupt[1]]
    return {
        "test": demo_test,
        "retrieval": demo_dataset / "retrieval",
        "two_shards": _classification_dir(root / "two_shards", demo_test, [test_samples[:181], test_samples[181:]]),
        "tiny": tiny,
        "corrupt": _classification_dir(root / "corrupt", demo_test, [corrupt]),
        "folder": _image_folder(root / "folder", demo_test, test_samples[:20]),
        "missing": root / "nowhere",
    }


pytestmark = pytest.mark.usefixtures("one_thread")


# --- what each rank runs ---------------------------------------------------------------------

class _RecordingTransform:
    """The model's transform, appending a digest of each decoded input to a file first: a count
    of what this process (or its loader workers, which get a pickled copy) decoded."""

    def __init__(self, transform, record_file: Path):
        self.transform, self.record_file = transform, str(record_file)

    def __call__(self, media):
        with open(self.record_file, "a") as f:
            f.write(hashlib.sha1(media.tobytes()).hexdigest() + "\n")
        return self.transform(media)


def _decoded(record_file: Path) -> Counter:
    return Counter(record_file.read_text().split()) if record_file.exists() else Counter()


def _eval_error(model, preprocess, tokenizer, path) -> str | None:
    try:
        run_training_eval(model, preprocess, tokenizer, zeroshot_path=path, batch_size=2)
    except EvalError as exc:
        return str(exc)
    return None


def _eval_on_rank(rank, world, data, outdir, workers_list, extras):
    torch.set_num_threads(1)  # the ranks share two cores: more threads only make them contend
    # Loader workers fork, as they do under torchrun, whatever start method the harness's ranks
    # inherit (a spawned loader pays a full import; spawn-safety is checked by pickling below).
    multiprocessing.set_start_method("fork", force=True)
    model, preprocess, tokenizer = _tiny_model()
    results = {}
    for workers in workers_list:
        for case, paths in CASES.items():
            recording = _RecordingTransform(preprocess, Path(outdir) / f"decoded-{case}-w{workers}-r{rank}.txt")
            results[case, workers] = run_training_eval(model, recording, tokenizer, batch_size=BATCH,
                                                       workers=workers, **paths(data))
    if extras:
        results["missing"] = _eval_error(model, preprocess, tokenizer, data["missing"])
        results["corrupt"] = _eval_error(model, preprocess, tokenizer, data["corrupt"])
        results["bf16"] = run_training_eval(model.to(torch.bfloat16), preprocess, tokenizer, data["test"],
                                            batch_size=BATCH, signal_dtype=torch.bfloat16)
    return results


# --- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_process(datasets, tmp_path_factory):
    """The reference: each case's metrics in this (single) process, and what it decoded."""
    model, preprocess, tokenizer = _tiny_model()
    records = tmp_path_factory.mktemp("single_process_decodes")
    metrics, decoded = {}, {}
    for case, paths in CASES.items():
        recording = _RecordingTransform(preprocess, records / f"{case}.txt")
        metrics[case] = run_training_eval(model, recording, tokenizer, batch_size=BATCH, **paths(datasets))
        decoded[case] = _decoded(records / f"{case}.txt")
    return metrics, decoded


def _assert_same_metrics(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert abs(got[name] - value) <= TOLERANCE, (name, got[name], value)


@pytest.mark.parametrize("world,workers_list", [(2, (0, 1)), (3, (1,))])
def test_ranks_share_the_samples_and_match_the_single_process_metrics(
        world, workers_list, datasets, single_process, tmp_path):
    metrics, decoded = single_process
    by_rank = run_workers(_eval_on_rank, world, tmp_path, datasets, str(tmp_path), workers_list, world == 2)
    for results in by_rank[1:]:
        assert results == by_rank[0]  # every rank returns the very same dict
    for workers in workers_list:
        for case in CASES:
            _assert_same_metrics(by_rank[0][case, workers], metrics[case])
            per_rank = [_decoded(tmp_path / f"decoded-{case}-w{workers}-r{rank}.txt") for rank in range(world)]
            # together the ranks decoded exactly what one process decodes: nothing twice, nothing missed
            assert sum(per_rank, Counter()) == decoded[case], (case, workers)
            if case != "tiny":
                assert all(per_rank), (case, workers)  # every rank did its part
    if world == 3:  # the 2-sample set left exactly one rank with nothing to score
        assert [bool(_decoded(tmp_path / f"decoded-tiny-w1-r{rank}.txt")) for rank in range(world)].count(False) == 1
    if world == 2:
        # a bad path, and a bad sample only rank 1 decodes: the same one-line error on both ranks, no hang
        assert by_rank[0]["missing"] == f"dataset not found: {datasets['missing']}"
        assert "no integer .cls member" in by_rank[0]["corrupt"]
        # signal_dtype works on the sharded path too
        assert abs(by_rank[0]["bf16"]["zeroshot/acc1"] - metrics["demo"]["zeroshot/acc1"]) <= 0.05


def test_signal_dtype_makes_a_bf16_model_evaluable(datasets, single_process):
    model, preprocess, tokenizer = _tiny_model()
    model = model.to(torch.bfloat16)
    paths = CASES["demo"](datasets)
    with pytest.raises(RuntimeError, match="Input type .* and weight type .* should be the same"):
        run_training_eval(model, preprocess, tokenizer, zeroshot_path=paths["zeroshot_path"], batch_size=BATCH)
    results = run_training_eval(model, preprocess, tokenizer, batch_size=BATCH, signal_dtype=torch.bfloat16, **paths)
    reference = single_process[0]["demo"]
    assert set(results) == set(reference)
    assert all(isinstance(v, (float, int)) for v in results.values())  # plain numbers, not bf16 tensors
    for name in ("zeroshot/acc1", "multilabel/acc1"):
        assert abs(results[name] - reference[name]) <= 0.05, name
    assert abs(results["retrieval/image_retrieval_recall@5"] - reference["retrieval/image_retrieval_recall@5"]) <= 0.05


def test_sharded_datasets_pickle_for_spawned_loader_workers(datasets):
    """A loader worker started by "spawn" gets a pickled copy of the dataset, split stages included."""
    _, preprocess, _ = _tiny_model()
    share = Share(1, 3)
    source = resolve_classification_set(datasets["two_shards"])
    for dataset in (open_classification_set(source, preprocess, share), open_multilabel_set(source, preprocess, share),
                    open_retrieval_set(sorted(datasets["retrieval"].glob("*.tar")), preprocess, share)):
        copy = pickle.loads(pickle.dumps(dataset))
        index, *_ = next(iter(copy))
        assert index % 3 == 1  # shard 0, position p with p % 3 == rank 1
