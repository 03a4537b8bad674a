"""Count the host reads of device values in one training step (each one a pipeline stall on a GPU).

    python benchmarks/host_syncs.py --data demo_data --model ViT-B-32 --batch 2 \
        --settings "ds.zero_stage=0" "ds.zero_stage=2 ds.precision=bf16"

Runs the trainer's per-step path (``train_step``, ``_after_step`` and the stop poll) on non-logging
steps and counts calls of ``Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__`` and
``numpy`` on tensors, with the file and line that made each one (ours or DeepSpeed's). On a CPU
these are the calls that synchronise a GPU when the tensor lives there. Some never touch a device
even on a GPU (the stop flag, a CPU tensor; torch AdamW's step counter, kept on the CPU): they are
listed with their file and line, so each can be told apart.
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
ROOT = Path(__file__).resolve().parents[1]


class ReadCounter:
    """Patches the tensor read methods; ``sites`` counts (file:line, method) while counting."""

    def __init__(self):
        self.sites: collections.Counter = collections.Counter()
        self.active = False
        self.originals = {name: getattr(torch.Tensor, name) for name in READS}

    def __enter__(self):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if counter.active:
                counter.sites[(caller(), name)] += 1
            return original(tensor, *args, **kwargs)

        return read


def caller() -> str:
    """The innermost frame outside torch itself: ours, or the library that asked for the value."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename or "/site-packages/deepspeed/" in frame.filename:
            path = frame.filename.replace(str(ROOT) + "/", "")
            return f"{path.split('site-packages/')[-1]}:{frame.lineno}"
    return "?"


def fixed_batch(trainer, rows: int) -> dict:
    size = trainer.built.preprocess_cfg.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    generator = torch.Generator().manual_seed(0)
    text = trainer.built.tokenizer([f"a photo of the digit {i % 10}" for i in range(rows)])
    return {"image": torch.randn(rows, 3, size, size, generator=generator), "text": text, "skipped": 0}


def count_one_setting(args, setting: str, run_dir: Path) -> collections.Counter:
    from clip_train.config import load_config
    from clip_train.engine.trainer import Trainer

    cfg = load_config(args.config, [f"model.name={args.model}", f"data.train={args.data}/train", "data.workers=0",
                                    f"data.batch_size={args.batch}", "eval.zeroshot=", "eval.retrieval=",
                                    "train.log_every=1000000", "checkpoint.every_steps=0", f"output_dir={run_dir}",
                                    *setting.split()])
    trainer = Trainer(cfg, overwrite=True)
    micro_batches = [fixed_batch(trainer, args.batch)] * cfg.train.accum_steps
    with ReadCounter() as counter:
        for step in range(args.warmup + args.steps):  # warm-up: ZeRO-3 records its fetch trace, buffers
            counter.active = step >= args.warmup
            trainer._after_step(trainer.train_step(micro_batches))
            trainer.stop.poll()
        counter.active = False
    trainer.stop.finish()
    return collections.Counter({site: n / args.steps for site, n in counter.sites.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a clip-prep demo output (its train/ shards)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps counted")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first, not counted")
    parser.add_argument("--settings", nargs="+", default=["ds.zero_stage=0", "ds.zero_stage=2 ds.precision=bf16"])
    parser.add_argument("--out", default="runs/host-syncs")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(f"| setting | reads per non-logging step ({args.model}, batch {args.batch}) | where |")
    print("|---|---|---|")
    for i, setting in enumerate(args.settings):
        sites = count_one_setting(args, setting, Path(args.out) / f"setting{i}")
        where = "; ".join(f"{site} `{name}` x{n:g}" for (site, name), n in sorted(sites.items()))
        print(f"| `{setting}` | {sum(sites.values()):g} | {where} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
