"""The linear probe against CLIP_benchmark 1.6.2's own `linear_probe.evaluate`, run on the CPU.

Parity is asserted with ==, not a tolerance: same features, same seeds, same float operations.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import balanced_accuracy_score

from clip_train.eval.linear_probe import (
    WEIGHT_DECAYS,
    Features,
    fewshot_subset,
    linear_probe,
    mean_per_class_recall,
    normalize_features,
)
from clip_train.eval.loading import EvalError

MODEL_ID = "digits"
PARITY_KEYS = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay")
# Their evaluate only tests `val_dataloader is not None` and, with the feature cache written,
# never iterates a loader; a sentinel makes any other use fail loudly.
UNUSED_LOADER = object()


class CpuPosingAsCuda(str):
    """The device string "cpu" that also compares equal to "cuda".

    evaluate() starts with `assert device == 'cuda'`; after that it hands `device` only to torch
    (`x.to(device)`, `torch.autocast(device, enabled=False)`), which reads the string's value,
    "cpu". autocast's own `== "cuda"` checks run only when enabled, and amp is off.
    """

    def __eq__(self, other):
        return isinstance(other, str) and str.__str__(other) in ("cuda", str.__str__(self))

    __hash__ = str.__hash__


@pytest.fixture(scope="module")
def digits() -> dict[str, Features]:
    """sklearn's digits (1797 x 64, 10 classes) through a fixed random projection to 256 dims,
    a tanh and noise, L2-normalised, split 600/300/897 in a fixed shuffled order.

    The noise is what makes the sweep matter: with it the best weight decay is inside the grid
    (index 41 of 97), so the refinement steps left and right are both exercised."""
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(20240611)
    x = torch.from_numpy(x).float() / 16.0
    x = torch.tanh(x @ torch.randn(64, 256, generator=g)) + torch.randn(len(x), 256, generator=g)
    features, targets = normalize_features(x), torch.from_numpy(y).long()
    order = torch.randperm(len(targets), generator=g)
    cuts = {"train": order[:600], "val": order[600:900], "test": order[900:]}
    return {name: Features(features[idx].contiguous(), targets[idx].contiguous()) for name, idx in cuts.items()}


@pytest.fixture(scope="module")
def four_digits(digits) -> dict[str, Features]:
    """Only classes 0..3: CLIP_benchmark reports acc5 as NaN there."""
    return {name: Features(f.features[f.targets < 4], f.targets[f.targets < 4]) for name, f in digits.items()}


@pytest.fixture
def reference_on_cpu(monkeypatch, reference_accuracy):
    """CLIP_benchmark's linear_probe module, made to run on the CPU for this test only."""
    from clip_benchmark.metrics import linear_probe as reference

    # linear_probe imported `accuracy` by name; give it conftest's numpy-2-safe copy of the formula.
    monkeypatch.setattr(reference, "accuracy", reference_accuracy.accuracy)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    # DataParallel wraps only when it finds an accelerator; hiding CUDA (on a GPU host) makes it
    # keep the plain module, and `range(torch.cuda.device_count())` gives it no devices.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    layer = torch.nn.Linear(3, 2)
    wrapped = torch.nn.DataParallel(layer, device_ids=[])
    x = torch.randn(4, 3)
    assert wrapped.module is layer and wrapped.device_ids == []
    assert torch.equal(wrapped(x), layer(x))
    return reference


def run_reference(reference, tmp_path, splits: dict[str, Features], fewshot_k: int, seed: int = 0) -> dict:
    """CLIP_benchmark's evaluate on a pre-written feature cache, so it skips featurisation."""
    feature_root = tmp_path / "features"
    feature_dir = feature_root / MODEL_ID
    feature_dir.mkdir(parents=True)
    for name, split in splits.items():
        torch.save(split.features, feature_dir / f"features_{name}.pt")
        torch.save(split.targets, feature_dir / f"targets_{name}.pt")
    # The cli seeds before featurising; with the cache in place its randperm is the next draw,
    # which our fewshot_subset reproduces with a generator seeded the same way.
    torch.manual_seed(seed)
    return reference.evaluate(
        torch.nn.Identity(), UNUSED_LOADER, UNUSED_LOADER, fewshot_k, 64, 0, 0.1, 10, MODEL_ID, seed,
        str(feature_root), CpuPosingAsCuda("cpu"),
        val_dataloader=UNUSED_LOADER if "val" in splits else None, normalize=True, amp=False, verbose=False,
    )


def run_ours(splits: dict[str, Features], fewshot_k: int, seed: int = 0) -> dict:
    return linear_probe(splits["train"], splits["test"], splits.get("val"), fewshot_k=fewshot_k, seed=seed)


def assert_parity(ours: dict, theirs: dict) -> None:
    for key in PARITY_KEYS:
        if key == "lp_acc5" and ours[key] is None:
            assert math.isnan(theirs[key])
        else:
            assert ours[key] == theirs[key], (key, ours[key], theirs[key])
    assert (ours["epochs"], ours["seed"], ours["fewshot_k"], ours["normalized"]) == (
        theirs["epochs"], theirs["seed"], theirs["fewshot_k"], theirs["normalized"])
    assert all(isinstance(ours[k], float) for k in ("lp_acc1", "lp_mean_per_class_recall", "weight_decay"))
    json.dumps(ours, allow_nan=False)


def record_fits(monkeypatch, module, name: str, weight_decay_at: int) -> list[tuple[float, torch.nn.Module]]:
    """Wrap the fitting function module.<name> to record (weight decay, fitted linear layer)."""
    fits = []
    fit = getattr(module, name)

    def recording(*args):
        model = fit(*args)
        fits.append((args[weight_decay_at], getattr(model, "module", model)))  # theirs is DataParallel
        return model

    monkeypatch.setattr(module, name, recording)
    return fits


def test_full_probe_with_val_sweep_matches_clip_benchmark(digits, reference_on_cpu, tmp_path, monkeypatch):
    from clip_train.eval import linear_probe as ours_module

    our_fits = record_fits(monkeypatch, ours_module, "_fit", weight_decay_at=1)  # _fit(split, weight_decay, setup)
    their_fits = record_fits(monkeypatch, reference_on_cpu, "train", weight_decay_at=3)  # train(loader, D, C, wd, ..)
    ours = run_ours(digits, fewshot_k=-1)
    assert_parity(ours, run_reference(reference_on_cpu, tmp_path, digits, fewshot_k=-1))
    # The sweep probed the same weight decays in the same order (we skip re-fitting the peak, which
    # reproduces its earlier result), and the final probes have the same weights, bit for bit.
    assert [wd for wd, _ in our_fits] == list(dict.fromkeys(wd for wd, _ in their_fits[:-1])) + [their_fits[-1][0]]
    assert torch.equal(our_fits[-1][1].weight, their_fits[-1][1].weight)
    assert torch.equal(our_fits[-1][1].bias, their_fits[-1][1].bias)
    # The probe learns: far above the 10% of chance, and the sweep picked a non-trivial decay.
    assert ours["lp_acc1"] > 0.8 and ours["lp_acc5"] > ours["lp_acc1"]
    assert 0 < WEIGHT_DECAYS.index(ours["weight_decay"]) < len(WEIGHT_DECAYS) - 1
    # Same inputs on the CPU without amp: the same numbers, bit for bit.
    assert run_ours(digits, fewshot_k=-1) == ours


def test_full_probe_without_val_matches_clip_benchmark(digits, reference_on_cpu, tmp_path):
    splits = {"train": digits["train"], "test": digits["test"]}
    ours = run_ours(splits, fewshot_k=-1)
    assert_parity(ours, run_reference(reference_on_cpu, tmp_path, splits, fewshot_k=-1))
    assert ours["weight_decay"] == 0.0


def test_fewshot_with_val_matches_clip_benchmark(digits, reference_on_cpu, tmp_path):
    ours = run_ours(digits, fewshot_k=5, seed=3)
    assert_parity(ours, run_reference(reference_on_cpu, tmp_path, digits, fewshot_k=5, seed=3))
    assert ours["lp_acc1"] > 0.3  # 5 shots of 10 classes: well above chance


def test_fewer_than_five_classes_gives_acc5_none(four_digits, reference_on_cpu, tmp_path):
    ours = run_ours(four_digits, fewshot_k=-1)
    assert ours["lp_acc5"] is None
    assert_parity(ours, run_reference(reference_on_cpu, tmp_path, four_digits, fewshot_k=-1))


def test_fewshot_subset_order_and_shots(digits):
    train = digits["train"]
    perm = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(7))
    everything = fewshot_subset(train, -1, seed=7)
    assert torch.equal(everything.targets, train.targets[perm])
    assert torch.equal(everything.features, train.features[perm])
    # k > 0: the first k of each class in the permuted order, kept in that order.
    seen: dict[int, int] = {}
    expected = []
    for p in perm.tolist():
        c = int(train.targets[p])
        if seen.get(c, 0) < 3:
            seen[c] = seen.get(c, 0) + 1
            expected.append(p)
    shots = fewshot_subset(train, 3, seed=7)
    assert torch.equal(shots.targets, train.targets[expected])
    assert torch.equal(shots.features, train.features[expected])


def test_class_with_too_few_shots_raises():
    targets = torch.tensor([0] * 6 + [1] * 6 + [2] * 3)
    train = Features(normalize_features(torch.randn(len(targets), 4)), targets)
    with pytest.raises(EvalError, match=r"class 2 has only 3"):
        fewshot_subset(train, 5, seed=0)
    with pytest.raises(EvalError, match=r"class 2 has only 3"):
        linear_probe(train, train, fewshot_k=5)


def test_mean_per_class_recall_equals_sklearn():
    g = torch.Generator().manual_seed(0)
    # Targets skip class 3; predictions include classes 3 and 9, which are never targets.
    targets = torch.tensor([0, 1, 2, 4, 5, 6])[torch.randint(0, 6, (500,), generator=g)]
    predictions = torch.where(torch.rand(500, generator=g) < 0.6, targets, torch.randint(0, 10, (500,), generator=g))
    assert mean_per_class_recall(predictions, targets) == balanced_accuracy_score(targets.numpy(), predictions.numpy())
    assert isinstance(mean_per_class_recall(predictions, targets), float)


def test_normalize_features_gives_unit_float32_rows():
    x = normalize_features(torch.randn(5, 8, dtype=torch.float64) * 3)
    assert x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=-1), torch.ones(5))
    assert np.isfinite(x.numpy()).all()
