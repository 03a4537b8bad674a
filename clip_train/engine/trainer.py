"""The Trainer: builds model, data and optimizer from a ``Config`` and runs small named steps."""
from __future__ import annotations

import itertools
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, to_yaml
from ..data import build_train_data
from ..eval import run_training_eval
from ..losses import sigmoid_contrastive_loss, softmax_contrastive_loss
from ..models import build_model, export_open_clip
from ..models.export import jsonable
from . import checkpoint as ckpt
from .distributed import all_reduce_mean, detect_env, init_process_group, pick_device
from .metrics_log import MetricsLog
from .optim import build_optimizer, set_lr, warmup_cosine

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self._claim_run_dir(resume, overwrite)
        self.env = detect_env()
        self.device = pick_device(cfg.train.device, self.env)
        init_process_group(self.env, self.device)
        self._seed_everything(cfg.train.seed + self.env.rank)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        sigmoid = cfg.loss.kind == "sigmoid"
        self.built = build_model(cfg.model.name, pretrained=cfg.model.pretrained, aug=cfg.data.augment,
                                 init_logit_bias=cfg.model.init_logit_bias if sigmoid else None)
        self.model = self.built.model.to(self.device)
        self.ddp_model = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                          if self.env.distributed else self.model)
        self.data = build_train_data(cfg.data, self.built.train_transform, self.built.tokenizer,
                                     seed=cfg.train.seed, rank=self.env.rank, world_size=self.env.world_size)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.data.batches_per_epoch
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step = 0
        self.epoch = 0
        self.metrics = MetricsLog(self.run_dir, enabled=self.env.is_main)
        if self.env.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        if resume:
            self.resume(resume)

    def _claim_run_dir(self, resume: str | None, overwrite: bool) -> None:
        """Refuse to mix a new run into an old one's metrics and checkpoints."""
        previous = [self.run_dir / name for name in ("metrics.jsonl", "checkpoints", "export")]
        if resume or not any(p.exists() for p in previous):
            return
        if not overwrite:
            raise ckpt.RunDirError(f"output_dir {self.run_dir} already holds a run: pass --resume latest to continue it, "
                              f"--overwrite to start over, or choose another output_dir")
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # --- the loop -------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run until ``total_steps``; then save, export and evaluate. Returns the final eval metrics."""
        log.info("training %d steps (%d per epoch, global batch %d)", self.total_steps,
                 self.data.batches_per_epoch, self.cfg.data.batch_size * self.env.world_size)
        while self.step < self.total_steps:
            batches = itertools.islice(self.data.loader, self.data.batches_per_epoch)
            ran = 0
            for batch in batches:
                self._after_step(self.train_step(batch))
                ran += 1
                if self.step >= self.total_steps:
                    break
            if ran == 0:
                raise RuntimeError("the data loader yielded no batch: check data.train and the shard sizes")
            self.epoch += 1
        return self.finish()

    def _after_step(self, metrics: dict) -> None:
        cfg = self.cfg.train
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            self.metrics.write({"step": self.step, "epoch": self.epoch, **metrics})
        if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < self.total_steps:
            self.metrics.write({"step": self.step, **self.evaluate(retrieval=False)})
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save()

    def train_step(self, batch: dict) -> dict:
        started = time.perf_counter()
        lr = warmup_cosine(self.step, total_steps=self.total_steps, warmup_steps=self.cfg.optim.warmup_steps,
                           base_lr=self.cfg.optim.lr, min_lr=self.cfg.optim.min_lr)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.forward_backward(batch)
        if self.cfg.optim.grad_clip > 0:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        with torch.no_grad():  # CLIP clamps the temperature so the logit scale never exceeds the max
            self.model.logit_scale.clamp_(0, math.log(self.cfg.model.max_logit_scale))
        self.step += 1
        seconds = time.perf_counter() - started
        return {**metrics, "lr": lr, "logit_scale": self.model.logit_scale.exp().item(),
                "samples_per_s": batch["image"].shape[0] * self.env.world_size / seconds,
                "skipped": batch["skipped"]}

    def forward_backward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        image = batch["image"].to(self.device, non_blocking=True)
        text = batch["text"].to(self.device, non_blocking=True)
        outputs = self.ddp_model(image, text)
        loss, metrics = self.contrastive_loss(*outputs)
        loss.backward()
        # The returned loss is this rank's share; its mean over ranks is the full-batch loss.
        metrics["loss"] = all_reduce_mean(loss.detach()).item()
        return loss, metrics

    def contrastive_loss(self, image_features, text_features, logit_scale, logit_bias=None):
        tile = self.cfg.loss.tile_size
        if self.cfg.loss.kind == "sigmoid":
            loss, metrics = sigmoid_contrastive_loss(image_features, text_features, logit_scale, logit_bias, tile_size=tile)
        else:
            loss, metrics = softmax_contrastive_loss(image_features, text_features, logit_scale, tile_size=tile)
        return loss, {k: v for k, v in metrics.items() if k != "loss"}

    # --- evaluation, saving, export --------------------------------------------------------------

    def evaluate(self, retrieval: bool = True) -> dict:
        if not self.env.is_main or not (self.cfg.eval.zeroshot or self.cfg.eval.retrieval):
            return {}
        return run_training_eval(self.model, self.built.eval_transform, self.built.tokenizer,
                                 zeroshot_path=self.cfg.eval.zeroshot or None,
                                 retrieval_path=(self.cfg.eval.retrieval or None) if retrieval else None,
                                 device=self.device, batch_size=self.cfg.eval.batch_size)

    def model_info(self) -> dict:
        return {"model_cfg": self.built.model_cfg, "preprocess_cfg": jsonable(self.built.preprocess_cfg)}

    def save(self) -> Path | None:
        if not self.env.is_main:
            return None
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "epoch": self.epoch, "rng": ckpt.rng_state()}
        return ckpt.save_checkpoint(self.run_dir, self.step, state, self.model_info(), self.cfg.train.keep_checkpoints)

    def resume(self, which: str) -> None:
        path = ckpt.resolve_checkpoint(self.run_dir, which)
        state, _ = ckpt.load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def finish(self) -> dict:
        self.save()
        if self.env.is_main:
            info = self.model_info()
            export_open_clip(self.model.state_dict(), info["model_cfg"], info["preprocess_cfg"], self.run_dir / "export")
        results = self.evaluate()
        if results:
            self.metrics.write({"step": self.step, **results})
        return results
