"""One rank of a precision x ZeRO-stage matrix run: ``clip-train`` itself, with test probes.

Run as ``python tests/matrix_worker.py REPORT_DIR KILL_AT NAN_AT -- <clip-train arguments>``, with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set for a distributed run (or none for one process).

The probes, installed by patching the trainer before ``clip_train.cli.main`` runs:

* **Data:** a synthetic stream whose global batch at (epoch, index) is fixed by those two numbers,
  and rank r takes rows ``[r b, (r+1) b)`` of it. So W ranks x batch b see exactly the rows one
  process sees with batch W b: the runs differ only in how the engine splits the work, which is
  what the matrix tests. (Loader resume is tested on real shards in ``test_resume.py``.)
* **NaN gradient at step NAN_AT:** the image features pass through an identity whose backward is
  NaN, so the loss is finite and only the gradients are not: the step must be skipped.
* **Masters:** after every step, the fp32 master of the logit scale (as DeepSpeed holds it) and a
  checksum of all fp32 masters go to ``REPORT_DIR/steps.jsonl`` (rank 0).
* **kill -9 at step KILL_AT:** every rank SIGKILLs itself right after that step (no cleanup).
* **At the end:** the fp32 masters are compared with the last checkpoint's ``weights.safetensors``;
  the result goes to ``REPORT_DIR/final.json``.
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch

REPORT_DIR, KILL_AT, NAN_AT = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
CLI_ARGS = sys.argv[sys.argv.index("--") + 1:]
ACCUM = int(next((a.split("=", 1)[1] for a in CLI_ARGS if a.startswith("train.accum_steps=")), 1))
STEPS_PER_EPOCH = 12


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class SyntheticData:
    """``epoch_batches(epoch, skip)`` as ``TrainData`` has it, from fixed random global batches: the
    step's global batch is fixed by (epoch, step); rank r's micro-batch m is one slice of it (the
    contrastive loss does not depend on the order of the pairs, only on which pairs are there)."""

    def __init__(self, cfg, tokenizer, rank, world_size, modality):
        from clip_train.data.modalities import MODALITIES

        self.batch, self.rank, self.world = cfg.batch_size, rank, world_size
        self.tokenizer, self.modality = tokenizer, MODALITIES.get(modality)
        self.batches_per_epoch, self.workers, self.roles = STEPS_PER_EPOCH * ACCUM, 0, 1
        self.num_samples = self.batches_per_epoch * self.batch * world_size

    def epoch_batches(self, epoch: int, skip: int = 0, consumed=None):
        for index in range(skip, self.batches_per_epoch):
            step, micro = divmod(index, ACCUM)
            generator = torch.Generator().manual_seed(1000 * epoch + step)
            rows = self.batch * self.world * ACCUM
            images = torch.randn(rows, 3, 32, 32, generator=generator)
            digits = torch.randint(0, 10, (rows,), generator=generator).tolist()
            text = self.tokenizer([f"a photo of the digit {d}" for d in digits])
            start = (self.rank * ACCUM + micro) * self.batch
            mine = slice(start, start + self.batch)
            yield {"image": images[mine], "text": text[mine], "skipped": 0}


def install_probes():
    from clip_train.engine import master_weights
    from clip_train.engine import trainer as trainer_module
    from clip_train.engine.trainer import Trainer

    def synthetic(cfg, transform, tokenizer, *, seed, rank=0, world_size=1, modality="image", **_):
        return SyntheticData(cfg, tokenizer, rank, world_size, modality)

    trainer_module.build_train_data = synthetic
    real_compute_loss, real_train_step, real_after_step = Trainer.compute_loss, Trainer.train_step, Trainer._after_step
    real_finish = Trainer.finish

    def compute_loss(self, inputs):
        if self.step + 1 == NAN_AT:
            inputs.image_features = NaNGradient.apply(inputs.image_features)
        return real_compute_loss(self, inputs)

    def train_step(self, micro_batches):
        metrics = real_train_step(self, micro_batches)
        scale = master_weights.full_master(self.model.logit_scale, self.optimizer).item()
        checksum = sum(v.double().sum().item() for v in self.master_weights().values() if v.is_floating_point())
        if self.env.is_main:
            with (REPORT_DIR / "steps.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, "master_log_scale": scale, "checksum": checksum,
                                    "applied": "skipped_step" not in metrics}) + "\n")
        return metrics

    def after_step(self, metrics):
        real_after_step(self, metrics)
        if self.step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self):
        results = real_finish(self)
        from clip_train.engine import checkpoint as ckpt

        saved = ckpt.read_weights(ckpt.list_checkpoints(self.run_dir)[-1])
        masters = self.master_weights()
        mismatched = [k for k, v in masters.items() if not torch.equal(saved[k], v)]
        if self.env.is_main:
            (REPORT_DIR / "final.json").write_text(json.dumps({"mismatched": mismatched, "keys": len(masters)}))
        return results

    Trainer.compute_loss, Trainer.train_step, Trainer._after_step = compute_loss, train_step, after_step
    Trainer.finish = finish


if __name__ == "__main__":
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    install_probes()
    from clip_train.cli import main

    sys.exit(main(CLI_ARGS))
