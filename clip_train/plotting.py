"""Training curves from ``metrics.jsonl``: ``RUN/curves.png`` at the end of a run, and
``clip-train plot RUN [RUN2 ...]`` for several runs side by side (one line per run in each panel)."""
from __future__ import annotations

from pathlib import Path

from .engine.run_summary import eval_values, is_train_record, loss_terms, read_metrics


def _loss_keys(train: list[dict]) -> list[str]:
    """loss and each term (a term's own diagnostics, ``contrastive/pos_logit_mean``, are left out)."""
    keys = {k for r in train for k, v in loss_terms(r).items() if isinstance(v, (int, float))}
    return ["loss", *sorted(keys - {"loss"})] if "loss" in keys else sorted(keys)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """One figure: losses, learning rate, logit scale and eval metrics against step."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a training node
    import matplotlib.pyplot as plt

    runs = {Path(d).name or str(d): read_metrics(Path(d)) for d in run_dirs}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    panels = {"loss": axes[0][0], "lr": axes[0][1], "logit_scale": axes[1][0], "eval": axes[1][1]}
    for label, records in runs.items():
        train = [r for r in records if is_train_record(r)]
        evals = [r for r in records if not is_train_record(r)]
        prefix = f"{label}: " if len(runs) > 1 else ""
        for key in _loss_keys(train):
            panels["loss"].plot(*_series(train, key), label=prefix + key)
        for key in ("lr", "logit_scale"):
            panels[key].plot(*_series(train, key), label=label)
        for key in sorted({k for r in evals for k in eval_values(r)}):
            panels["eval"].plot(*_series(evals, key), marker="o", label=prefix + key)
    for name, axis in panels.items():
        axis.set_title({"loss": "loss and terms", "lr": "learning rate", "logit_scale": "logit scale",
                        "eval": "evaluation"}[name])
        axis.set_xlabel("step")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
