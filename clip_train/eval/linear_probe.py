"""Linear probe on frozen image features, as CLIP_benchmark 1.6.2 defines it.

Reference: `clip_benchmark/metrics/linear_probe.py` with the CLI defaults (`--fewshot_k -1`,
`--fewshot_epochs 10`, `--fewshot_lr 0.1`, `--batch_size 64`, `--seed 0`). One linear layer is
trained with AdamW and a cosine schedule; with a validation split the weight decay comes from
OpenAI's sweep (CLIP paper, A.3): a coarse grid of 7 values, then a bisection-like refinement on a
97-value log grid. Given the same features, the numbers are bit-identical to CLIP_benchmark's on
the CPU (tests/test_eval_linear_probe.py checks it).

Where we differ on purpose:
- the CPU works (CLIP_benchmark asserts CUDA);
- the few-shot permutation has its own seeded generator, so it does not depend on how much of the
  global RNG the featuriser consumed;
- a class with fewer than k shots raises EvalError instead of silently returning None;
- acc5 is None, not NaN, with fewer than 5 test classes (NaN is not valid JSON);
- a probe's validation accuracy is computed once per weight decay: CLIP_benchmark retrains the
  current peak in every refinement round, but each fit reseeds, so the retrain repeats the result;
- val/test labels the training split never reaches (>= its class count) raise EvalError.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from clip_train.eval.loading import EvalError

# The 97-value grid and the 7 coarse probes on it. The coarse indices come from float equality
# with a second logspace, as CLIP_benchmark computes them: a value that differs in its last bit
# would silently drop a probe, so we keep the test rather than assuming every 16th index.
WEIGHT_DECAYS: list[float] = np.logspace(-6, 2, num=97).tolist()
_COARSE_VALUES = np.logspace(-6, 2, num=7).tolist()
COARSE_INDICES: list[int] = [i for i, wd in enumerate(WEIGHT_DECAYS) if wd in _COARSE_VALUES]
REFINE_SPANS = (8, 4, 2, 1)


@dataclass
class Features:
    """L2-normalised image features and integer targets, on the CPU."""

    features: torch.Tensor  # (N, D) float32
    targets: torch.Tensor  # (N,) int64


def normalize_features(x: torch.Tensor) -> torch.Tensor:
    """Unit-norm float32 rows, what the probe expects of every split."""
    return F.normalize(x.float(), dim=-1)


def fewshot_subset(train: Features, k: int, seed: int) -> Features:
    """The training samples the probe fits on, in a seeded random order.

    k < 0: every sample. k > 0: the first k of each class in that order; a class present with
    fewer than k samples raises EvalError. (Classes absent from the split are not checked, as in
    CLIP_benchmark.)
    """
    if k == 0:
        raise EvalError("fewshot_k must be > 0 (shots per class) or < 0 (all samples), got 0")
    order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(seed))
    if k > 0:
        order = order[_first_k_of_each_class(train.targets[order], k)]
    return Features(train.features[order], train.targets[order])


def _first_k_of_each_class(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the samples that are among the first k of their class, in the given order."""
    counts = torch.bincount(targets)
    short = ((counts > 0) & (counts < k)).nonzero().flatten()
    if len(short):
        cls = int(short[0])
        raise EvalError(f"few-shot k={k}: class {cls} has only {int(counts[cls])} training samples")
    # A stable sort groups each class's samples while keeping their order, so a sample's rank in
    # its class is its position in the sorted list minus where its class's group starts.
    by_class = torch.argsort(targets, stable=True)
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(len(targets)) - group_start[targets[by_class]]
    return rank < k


@dataclass
class _Split:
    """A split's tensors, moved to the probe's device once."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class _Setup:
    """What every fit of one probe shares."""

    dim: int
    num_classes: int
    lr: float
    epochs: int
    batch_size: int
    seed: int
    device: torch.device
    amp: bool

    def autocast(self):
        return torch.autocast(self.device.type, enabled=self.amp)


def _shuffled_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    """One epoch of sample indices in batches, shuffled as CLIP_benchmark's feature loaders are.

    We iterate a real DataLoader(shuffle=True) over the indices rather than the features: it
    draws from the global RNG exactly as theirs does (a base seed, then the sampler's seed, per
    epoch, whatever this torch version does), while collating 64 ints is nearly free.
    """
    return list(DataLoader(range(n), batch_size=batch_size, shuffle=True, collate_fn=torch.tensor))


def _cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    # CLIP_benchmark's cosine_lr with warmup 0, in numpy as there, so every lr is bit-identical.
    return float(0.5 * (1 + np.cos(np.pi * step / total_steps)) * base_lr)


@torch.enable_grad()  # evaluation calls the probe under no_grad; the probe itself trains
def _fit(split: _Split, weight_decay: float, setup: _Setup) -> torch.nn.Linear:
    """Train a linear classifier on `split`: AdamW, cosine lr set before each step, cross-entropy."""
    # Each fit starts from the seed, as CLIP_benchmark's train() does. Only the CPU generator
    # matters: the layer is initialised on the CPU (so every device starts from the same weights)
    # and the loaders shuffle with it.
    torch.default_generator.manual_seed(setup.seed)
    model = torch.nn.Linear(setup.dim, setup.num_classes).to(setup.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=weight_decay)
    # Training consumes no random numbers, so drawing every epoch's order up front draws exactly
    # what drawing one epoch at a time would, and moves all indices to the device in one copy.
    epochs = [_shuffled_batches(len(split), setup.batch_size) for _ in range(setup.epochs)]
    batches = [b for epoch in epochs for b in epoch]
    indices = torch.cat(batches).to(setup.device).split([len(b) for b in batches])
    total_steps = len(batches)
    for step, idx in enumerate(indices):
        lr = _cosine_lr(step, total_steps, setup.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        with setup.autocast():
            loss = F.cross_entropy(model(split.x[idx]), split.y[idx])
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def _logits(model: torch.nn.Linear, split: _Split, setup: _Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and targets on the CPU, in the shuffled batches CLIP_benchmark infers with.

    The order does not change any metric; the same batches keep each row's logits bit-identical
    (a matmul's rounding may depend on how many rows it multiplies).
    """
    batches = _shuffled_batches(len(split), setup.batch_size)
    order = torch.cat(batches).to(setup.device)
    with setup.autocast():
        logits = torch.cat([model(split.x[idx]) for idx in order.split([len(b) for b in batches])])
    return logits.float().cpu(), split.y[order].cpu()


def _topk_accuracies(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[float]:
    # One topk for the largest k, its first columns for the others, as CLIP_benchmark's accuracy():
    # with tied logits, topk(1) and the first column of topk(5) could disagree.
    top = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices
    hits = top == targets.view(-1, 1)
    return [int(hits[:, :k].sum()) / len(targets) for k in ks]


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Balanced accuracy: the mean recall over the classes present in `targets`.

    sklearn's balanced_accuracy_score, which CLIP_benchmark reports, computed the same way (float64
    recalls in class order, numpy's mean) so that the value is bit-identical, not just close.
    """
    targets = targets.numpy()
    counts = np.bincount(targets)
    hits = np.bincount(targets[predictions.numpy() == targets], minlength=len(counts))
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


def _val_accuracy(model: torch.nn.Linear, val: _Split, setup: _Setup) -> float:
    logits, targets = _logits(model, val, setup)
    return _topk_accuracies(logits, targets, (1,))[0]


def _find_peak(indices: list[int], val_acc) -> int:
    # The first index with the strictly best accuracy; index 0 if none beats 0.
    best, best_acc = 0, 0.0
    for i in indices:
        acc = val_acc(i)
        if acc > best_acc:
            best, best_acc = i, acc
    return best


def _sweep_weight_decay(train: _Split, val: _Split, setup: _Setup, bar: tqdm) -> float:
    """OpenAI's weight decay sweep: coarse grid, then [left, peak, right] with halving spans."""
    accuracies: dict[int, float] = {}

    def val_acc(i: int) -> float:
        if i not in accuracies:
            accuracies[i] = _val_accuracy(_fit(train, WEIGHT_DECAYS[i], setup), val, setup)
        bar.update()
        return accuracies[i]

    peak = _find_peak(COARSE_INDICES, val_acc)
    for span in REFINE_SPANS:
        left, right = max(peak - span, 0), min(peak + span, len(WEIGHT_DECAYS) - 1)
        peak = _find_peak([left, peak, right], val_acc)
    return WEIGHT_DECAYS[peak]


def _check_split(name: str, split: Features, dim: int, num_classes: int | None) -> None:
    f, t = split.features, split.targets
    if f.ndim != 2 or t.ndim != 1 or len(f) != len(t) or len(t) == 0:
        raise EvalError(
            f"{name} features must be (N, D) with N >= 1 and targets (N,), "
            f"got {tuple(f.shape)} and {tuple(t.shape)}"
        )
    if f.shape[1] != dim:
        raise EvalError(f"{name} features have dimension {f.shape[1]}, the training features {dim}")
    if t.dtype != torch.int64 or int(t.min()) < 0:
        raise EvalError(f"{name} targets must be non-negative int64 class indices")
    if num_classes is not None and int(t.max()) >= num_classes:
        raise EvalError(f"{name} split has class {int(t.max())}, the training split only classes 0..{num_classes - 1}")


def linear_probe(
    train: Features,
    test: Features,
    val: Features | None = None,
    *,
    fewshot_k: int = -1,
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    device="cpu",
    amp: bool = False,
    progress: bool = False,
) -> dict:
    """Fit and score a linear probe; the metrics CLIP_benchmark's linear_probe task reports.

    With `val`: the weight decay is swept on it, then the final probe is fitted on train+val
    (fewshot_k < 0) or on the few-shot train only (fewshot_k > 0: adding val would give more
    shots than asked). Without: weight decay 0, fitted on train. The caller's RNG state is left
    as it was.
    """
    dim = train.features.shape[1] if train.features.ndim == 2 else -1
    _check_split("train", train, dim, None)
    num_classes = int(train.targets.max()) + 1  # of the full train split, before any few-shot cut
    for name, split in (("val", val), ("test", test)):
        if split is not None:
            _check_split(name, split, dim, num_classes)
    device = torch.device(device)
    setup = _Setup(dim, num_classes, lr, epochs, batch_size, seed, device, amp)

    def on_device(f: torch.Tensor, t: torch.Tensor) -> _Split:
        return _Split(f.to(device), t.to(device))

    # The fits reseed and draw from the global CPU generator (as CLIP_benchmark's do); restore it.
    with torch.random.fork_rng(devices=[]):
        shots = fewshot_subset(train, fewshot_k, seed)
        train_split = on_device(shots.features, shots.targets)
        fits = 1 if val is None else len(COARSE_INDICES) + 3 * len(REFINE_SPANS) + 1
        with tqdm(total=fits, desc="linear probe fits", leave=False, disable=not progress) as bar:
            if val is None:
                weight_decay, final_split = 0.0, train_split
            else:
                val_split = on_device(val.features, val.targets)
                weight_decay = _sweep_weight_decay(train_split, val_split, setup, bar)
                final_split = train_split
                if fewshot_k < 0:
                    # train-then-val, the few-shot order first, as CLIP_benchmark concatenates them
                    final_split = on_device(
                        torch.cat([shots.features, val.features]), torch.cat([shots.targets, val.targets])
                    )
            model = _fit(final_split, weight_decay, setup)
            bar.update()
            logits, targets = _logits(model, on_device(test.features, test.targets), setup)

    # acc5 only when the test labels reach class 5, CLIP_benchmark's rule (`target.max() >= 5`).
    if int(targets.max()) >= 5:
        acc1, acc5 = _topk_accuracies(logits, targets, (1, 5))
    else:
        (acc1,), acc5 = _topk_accuracies(logits, targets, (1,)), None
    return {
        "lp_acc1": acc1,
        "lp_acc5": acc5,
        "lp_mean_per_class_recall": mean_per_class_recall(logits.argmax(dim=1), targets),
        "weight_decay": float(weight_decay),
        "epochs": epochs,
        "seed": seed,
        "fewshot_k": fewshot_k,
        "normalized": True,
    }
