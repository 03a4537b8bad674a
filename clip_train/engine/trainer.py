"""The Trainer: builds model, data and a DeepSpeed engine from a ``Config`` and runs small named steps."""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, to_yaml
from ..data import build_train_data
from ..eval import run_training_eval
from ..losses.objective import CAPTION, IMAGE_VIEW2, TEXT_VIEWS, Objective, TermInputs
from ..models import build_model, export_model
from ..models.export import jsonable
from . import checkpoint as ckpt
from .distributed import all_reduce_mean, any_rank, detect_env, pick_device
from .ds_setup import build_ds_config, init_distributed, initialize
from .gradcache import gradcache_backward
from .metrics_log import MetricsLog
from .model_outputs import as_tuple, with_vector_logit_params
from .optim import build_optimizer, warmup_cosine

log = logging.getLogger(__name__)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says what to change."""


class Trainer:
    def __init__(self, cfg: Config, *, resume: str | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.env = detect_env()
        if self.env.is_main:
            self._claim_run_dir(resume, overwrite)
        self.device = pick_device(cfg.train.device, self.env)
        init_distributed(self.env, self.device, cfg.train.dist_timeout_s)
        self._seed_everything(cfg.train.seed + self.env.rank)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        sigmoid = cfg.loss.kind == "sigmoid"
        self.built = build_model(cfg.model.name, pretrained=cfg.model.pretrained, aug=cfg.data.augment,
                                 init_logit_bias=cfg.model.init_logit_bias if sigmoid else None)
        self.built.model.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self.objective = Objective(cfg.objective, cfg.loss)
        self._check_objective()
        self.data = build_train_data(cfg.data, self.built.train_transform, self.built.tokenizer,
                                     seed=cfg.train.seed, rank=self.env.rank, world_size=self.env.world_size,
                                     views=frozenset(self.objective.needs - {CAPTION}),
                                     word_dropout=cfg.objective.text_word_dropout, modality=self.built.modality)
        self.steps_per_epoch = self.data.batches_per_epoch // cfg.train.accum_steps
        if self.steps_per_epoch == 0:
            raise TrainingError(f"an epoch has {self.data.batches_per_epoch} batches, fewer than "
                                f"train.accum_steps={cfg.train.accum_steps}: lower train.accum_steps or data.batch_size")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self._build_engine()
        self.step = self.epoch = self.step_in_epoch = 0
        self.skipped_steps = self.nonfinite_streak = 0
        self.stop_signal: int | None = None
        self._pending_rng: dict | None = None
        self.metrics = MetricsLog(self.run_dir, enabled=self.env.is_main)
        if self.env.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        if resume:
            self.resume(resume)

    def _claim_run_dir(self, resume: str | None, overwrite: bool) -> None:
        """Refuse to mix a new run into an old one's metrics and checkpoints."""
        previous = [self.run_dir / name for name in ("metrics.jsonl", "checkpoints", "export")]
        if resume or not any(p.exists() for p in previous):
            return
        if not overwrite:
            raise ckpt.RunDirError(f"output_dir {self.run_dir} already holds a run: pass --resume latest to "
                                   f"continue it, --overwrite to start over, or choose another output_dir")
        for path in previous:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def _check_objective(self) -> None:
        needs = self.objective.needs
        if CAPTION in needs and not hasattr(self.built.model, "text_decoder"):
            raise TrainingError("objective.terms.caption needs a CoCa model: set model.name=demo-tiny-coca, "
                                "coca_ViT-B-32, or another CoCa config")
        if needs and self.cfg.train.accum_steps > 1:
            raise TrainingError("train.accum_steps > 1 (GradCache) works with the terms computed from the two "
                                "embeddings; intra_image, intra_text and caption need second views or caption "
                                "logits: use train.accum_steps=1 with them")

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _build_engine(self) -> None:
        cfg = self.cfg
        model = with_vector_logit_params(self.built).to(self.device)
        optimizer = build_optimizer(model, cfg.optim)
        base_lr = cfg.optim.lr
        # Our schedule through a LambdaLR, so DeepSpeed steps it with the optimizer and checkpoints it.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
            step, total_steps=self.total_steps, warmup_steps=cfg.optim.warmup_steps,
            base_lr=base_lr, min_lr=cfg.optim.min_lr) / base_lr)
        self.ds_config = build_ds_config(cfg, self.env.world_size)
        self.engine, self.optimizer, self.scheduler = initialize(model, optimizer, scheduler, self.ds_config)
        self.model = self.engine.module
        self.compute_dtype = PRECISION_DTYPES[cfg.ds.precision]

    # --- the loop -------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run until ``total_steps`` (or a stop signal); then save, export and evaluate."""
        log.info("training %d steps (%d per epoch, contrastive batch %d)", self.total_steps, self.steps_per_epoch,
                 self.cfg.data.batch_size * self.cfg.train.accum_steps * self.env.world_size)
        previous_handlers = self._install_signal_handlers()
        try:
            while self.step < self.total_steps and not self._should_stop():
                self._run_epoch()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        if self.stop_signal is not None:
            self.save()
            log.warning("stopped by signal %d at step %d; checkpoint saved, continue with --resume latest",
                        self.stop_signal, self.step)
            return {}
        return self.finish()

    def _run_epoch(self) -> None:
        accum = self.cfg.train.accum_steps
        batches = self.data.epoch_batches(self.epoch, skip=self.step_in_epoch * accum)
        if self._pending_rng is not None:  # after the fast-forward, so what follows matches an uninterrupted run
            ckpt.set_rng_state(self._pending_rng)
            self._pending_rng = None
        for group in iter(lambda: list(itertools.islice(batches, accum)), []):
            if len(group) < accum:
                break
            self._after_step(self.train_step(group))
            if self.step >= self.total_steps or self._should_stop():
                return
        self.epoch += 1
        self.step_in_epoch = 0

    def _after_step(self, metrics: dict) -> None:
        cfg = self.cfg.train
        if self.step % cfg.log_every == 0 or self.step == self.total_steps or metrics.get("skipped_step"):
            self.metrics.write({"step": self.step, "epoch": self.epoch, **metrics})
        if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < self.total_steps:
            self.metrics.write({"step": self.step, **self.evaluate(retrieval=False)})
        if cfg.save_every and self.step % cfg.save_every == 0 and not metrics.get("skipped_step"):
            self.save()

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over ``accum_steps`` micro-batches; a non-finite step is skipped and counted."""
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        loss, metrics = self.forward_backward(micro_batches)
        finite = math.isfinite(loss) and not self._nonfinite_gradients()
        if finite:
            self._optimizer_step()
        else:
            self._skip_step(loss)
        samples = sum(b["text"].shape[0] for b in micro_batches) * self.env.world_size
        return {**metrics, "loss": loss, "lr": lr, "logit_scale": self._logit_scale(),
                "samples_per_s": samples / (time.perf_counter() - started),
                "skipped": sum(b["skipped"] for b in micro_batches), "skipped_steps": self.skipped_steps,
                **({"skipped_step": True} if not finite else {})}

    def forward_backward(self, micro_batches: list[dict]) -> tuple[float, dict]:
        """Loss over the whole contrastive batch; backward only when it is finite on every rank.

        Returns the full-batch loss (this rank's share averaged over ranks) and the term metrics.
        """
        if len(micro_batches) == 1:
            batch = micro_batches[0]
            loss, metrics = self.compute_loss(self._term_inputs(self.engine(*self._inputs(batch)), batch))
            mean_loss = all_reduce_mean(loss.detach().float()).item()
            if math.isfinite(mean_loss):
                self.engine.backward(loss)
            return mean_loss, self._averaged(metrics)
        try:
            _, metrics = gradcache_backward(lambda batch: as_tuple(self.engine(*self._inputs(batch))),
                                            self._checked_loss, micro_batches, backward=self._gradcache_micro_backward)
        except NonFiniteLoss as err:
            return err.loss, {}
        mean_loss = metrics.pop("mean_loss")
        return mean_loss, self._averaged(metrics)

    def compute_loss(self, inputs: TermInputs) -> tuple[torch.Tensor, dict]:
        return self.objective(inputs)

    def _checked_loss(self, *outputs):
        """GradCache's loss: stops before any backward through the model when the loss is not finite."""
        loss, metrics = self.compute_loss(_base_term_inputs(*outputs))
        mean_loss = all_reduce_mean(loss.detach().float()).item()
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(mean_loss)
        return loss, {**metrics, "mean_loss": mean_loss}

    def _gradcache_micro_backward(self, surrogate: torch.Tensor, is_last: bool) -> None:
        # DeepSpeed's documented manual accumulation: gradients are reduced with the last micro-batch
        # and the caller steps once. The cached gradients are already those of the full-batch loss,
        # so no 1/accum scaling either.
        self.engine.set_gradient_accumulation_boundary(is_last)
        self.engine.backward(surrogate, scale_wrt_gas=False)

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._signal(batch[self.data.modality.name]), batch["text"].to(self.device, non_blocking=True)

    def _signal(self, signal: torch.Tensor) -> torch.Tensor:
        """The image, audio or ECG batch, on the device in the compute precision."""
        return signal.to(self.device, dtype=self.compute_dtype, non_blocking=True)

    def _term_inputs(self, outputs, batch: dict) -> TermInputs:
        """The objective's inputs: the forward's outputs plus the second views the active terms need."""
        inputs = _base_term_inputs(*as_tuple(outputs))
        needs = self.objective.needs
        if IMAGE_VIEW2 in needs:
            view2 = batch[f"{self.data.modality.name}_view2"]
            inputs.image_features_view2 = self.model.encode_image(self._signal(view2), normalize=True)
        if TEXT_VIEWS in needs:
            inputs.text_features_view1, inputs.text_features_view2 = (
                self.model.encode_text(batch[name].to(self.device), normalize=True) for name in ("text_view1", "text_view2"))
        if CAPTION in needs:
            inputs.caption_logits, inputs.caption_labels = outputs["logits"], outputs["labels"]
        return inputs

    def _averaged(self, metrics: dict) -> dict:
        """Term values averaged over ranks: each rank holds its share of the full-batch value."""
        if not metrics or not self.env.distributed:
            return metrics
        values = all_reduce_mean(torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device))
        return dict(zip(metrics, values.tolist()))

    # --- optimizer step and faults ---------------------------------------------------------------

    def _optimizer_step(self) -> None:
        self.engine.step()
        with torch.no_grad(), self._full_weights([self.model.logit_scale], modify=True):
            # CLIP clamps the learned temperature
            self.model.logit_scale.clamp_(0, math.log(self.cfg.model.max_logit_scale))
        self.step += 1
        self.step_in_epoch += 1
        self.nonfinite_streak = 0

    def _nonfinite_gradients(self) -> bool:
        """Checks the gradients this rank can see (all of them below ZeRO-2), agreed over ranks."""
        bad = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.model.parameters())
        return any_rank(bad)

    def _skip_step(self, loss: float) -> None:
        self.engine.zero_grad()  # no optimizer step: weights, moments and the schedule stay as they were
        self.step += 1
        self.step_in_epoch += 1
        self.skipped_steps += 1
        self.nonfinite_streak += 1
        log.warning("step %d skipped: non-finite loss or gradient (loss=%s); %d skipped so far",
                    self.step, loss, self.skipped_steps)
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite:
            raise TrainingError(f"{self.nonfinite_streak} consecutive steps had a non-finite loss or gradient "
                                f"(last at step {self.step}): lower optim.lr, check the data, or use ds.precision=fp32")

    def _logit_scale(self) -> float:
        with self._full_weights([self.model.logit_scale]):
            return self.model.logit_scale.detach().float().exp().item()

    def _full_weights(self, params: list | None = None, modify: bool = False):
        """Under ZeRO-3 the parameters are partitioned: gather ``params`` (default: all of them) for
        code that reads whole tensors. Per-step uses name only the tensors they touch."""
        if self.cfg.ds.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.model.parameters()) if params is None else params
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    # --- signals ----------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict:
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # acted on at the next step boundary, on every rank together

    def _should_stop(self) -> bool:
        stop = any_rank(self.stop_signal is not None)
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return stop

    # --- evaluation, saving, export --------------------------------------------------------------

    def evaluate(self, retrieval: bool = True) -> dict:
        if not (self.cfg.eval.zeroshot or self.cfg.eval.retrieval):
            return {}
        with self._full_weights():
            results = run_training_eval(self.model, self.built.eval_transform, self.built.tokenizer,
                                        zeroshot_path=self.cfg.eval.zeroshot or None,
                                        retrieval_path=(self.cfg.eval.retrieval or None) if retrieval else None,
                                        device=self.device, batch_size=self.cfg.eval.batch_size) if self.env.is_main else {}
        return results

    def model_info(self) -> dict:
        return {"model_cfg": self.built.model_cfg, "preprocess_cfg": jsonable(self.built.preprocess_cfg)}

    def _weights_finite(self) -> bool:
        with self._full_weights():
            bad = any(not torch.isfinite(p).all() for p in self.model.parameters())
        return not any_rank(bad)

    def save(self) -> Path | None:
        """All ranks write their part into a partial directory; rank 0 renames it into place."""
        if not self._weights_finite():
            log.error("weights are not finite at step %d: not saving a checkpoint", self.step)
            return None
        tmp = ckpt.partial_dir(self.run_dir, self.step)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        # Under one key of our own: DeepSpeed keeps keys such as "skipped_steps" for itself.
        client_state = {"clip_train": {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                                       "skipped_steps": self.skipped_steps}}
        self.engine.save_checkpoint(str(tmp), tag=ckpt.DS_TAG, client_state=client_state, save_latest=False)
        ckpt.write_rank_state(tmp, self.env.rank)
        if self.cfg.ds.zero_stage < 3 and self.env.is_main:
            ckpt.write_weights(tmp, self.model.state_dict())
        _barrier()
        final = ckpt.commit(self.run_dir, self.step, self.model_info(), self.cfg.train.keep_checkpoints) \
            if self.env.is_main else None
        _barrier()
        return final

    def resume(self, which: str) -> None:
        path = ckpt.resolve_checkpoint(self.run_dir, which)
        loaded, client_state = self.engine.load_checkpoint(str(path), tag=ckpt.DS_TAG)
        if loaded is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
        position = client_state["clip_train"]
        self.step, self.epoch = position["step"], position["epoch"]
        self.step_in_epoch, self.skipped_steps = position["step_in_epoch"], position["skipped_steps"]
        self._pending_rng = ckpt.read_rank_state(path, self.env.rank)
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", path, self.step, self.epoch, self.step_in_epoch)

    def export(self) -> None:
        info = self.model_info()
        with self._full_weights():
            if self.env.is_main:
                export_model(self.model.state_dict(), info["model_cfg"], info["preprocess_cfg"],
                                 self.run_dir / "export")
        _barrier()

    def finish(self) -> dict:
        self.save()
        self.export()
        results = self.evaluate()
        if results:
            self.metrics.write({"step": self.step, **results})
        return results


def _base_term_inputs(image_features, text_features, logit_scale, logit_bias=None) -> TermInputs:
    """The two embeddings and the 0-dim scale (and bias) the loss terms take; the model holds them as shape [1]."""
    return TermInputs(image_features, text_features, logit_scale.reshape(()),
                      None if logit_bias is None else logit_bias.reshape(()))


class NonFiniteLoss(Exception):
    def __init__(self, loss: float):
        super().__init__(f"non-finite loss {loss}")
        self.loss = loss


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
