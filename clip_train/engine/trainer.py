"""The Trainer: builds model, data and a DeepSpeed engine from a ``Config`` and runs small named steps."""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import shutil
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
from . import master_weights
from .control import StopRequest
from .distributed import all_reduce_mean, detect_env, pick_device
from .ds_setup import after_skipped_step, build_ds_config, init_distributed, initialize
from .faults import first_line, is_collective_failure
from .gradcache import gradcache_backward
from .metrics_log import MetricsLog
from .progress import Progress, ThroughputWindow, wants_bar
from .run_summary import write_summary
from .tracking import build_trackers
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
        self.phase = "startup"  # what the run is doing, for error reports
        if self.env.is_main:
            self._claim_run_dir(resume, overwrite)
        self.device = pick_device(cfg.train.device, self.env)
        init_distributed(self.env, self.device, cfg.train.dist_timeout_s)
        ckpt.check_shared_filesystem(self.run_dir, self.env.rank, self.env.world_size)
        self.stop = StopRequest(self.env.distributed)
        self._seed_everything(cfg.train.seed + self.env.rank)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        sigmoid = cfg.loss.kind == "sigmoid"
        self.objective = Objective(cfg.objective, cfg.loss)
        self.built = build_model(cfg.model.name, pretrained=cfg.model.pretrained, aug=cfg.data.augment,
                                 init_logit_bias=cfg.model.init_logit_bias if sigmoid else None)
        self.built.model.set_grad_checkpointing(cfg.model.grad_checkpointing)
        self._check_objective()
        self.data = build_train_data(cfg.data, self.built.train_transform, self.built.tokenizer,
                                     seed=cfg.train.seed, rank=self.env.rank, world_size=self.env.world_size,
                                     views=frozenset(self.objective.needs - {CAPTION}),
                                     word_dropout=cfg.objective.text_word_dropout, modality=self.built.modality)
        self.steps_per_epoch = self.data.batches_per_epoch // cfg.train.accum_steps
        if self.steps_per_epoch == 0:
            raise TrainingError(f"an epoch has {self.data.batches_per_epoch} batches, fewer than "
                                f"train.accum_steps={cfg.train.accum_steps}: lower train.accum_steps or data.batch_size")
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        self._build_engine()
        self.step = self.epoch = self.step_in_epoch = 0
        self.skipped_steps = self.nonfinite_streak = self.skipped_samples = 0
        self.progress: Progress | None = None
        self.throughput = ThroughputWindow()
        self.stopping = False
        self._pending_rng: dict | None = None
        self.data_consumed: dict[int, int] = {}  # loader role -> raw samples it delivered this epoch
        self.metrics = MetricsLog(self.run_dir, enabled=self.env.is_main, total_steps=self.total_steps)
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
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
            step, total_steps=self.total_steps, warmup_steps=warmup, base_lr=base_lr, min_lr=cfg.optim.min_lr) / base_lr)
        self.ds_config = build_ds_config(cfg, self.env.world_size)
        # grad_clip: fp32 at ZeRO-0, where we clip with the norm our non-finite test computes anyway.
        self.engine, self.optimizer, self.scheduler, self.grad_clip = initialize(model, optimizer, scheduler,
                                                                                 self.ds_config)
        self.model = self.engine.module
        self.compute_dtype = PRECISION_DTYPES[cfg.ds.precision]
        # DeepSpeed's ZeRO, bf16 and fp16 optimizers test the gradient norm themselves and skip a
        # non-finite step (fp16: and lower the loss scale); only plain fp32 at ZeRO-0 needs our check.
        self.ds_checks_gradients = hasattr(self.optimizer, "overflow")

    # --- the loop -------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run until ``total_steps`` (or a stop signal); then save, export and evaluate."""
        log.info("training %d steps (%d per epoch, contrastive batch %d)", self.total_steps, self.steps_per_epoch,
                 self.contrastive_batch)
        left_out = self.data.num_samples - self.steps_per_epoch * self.contrastive_batch
        if left_out:
            log.info("%d of the epoch's %d samples are left out of each epoch (the last, partial batch)", left_out,
                     self.data.num_samples)
        started, start_step = time.perf_counter(), self.step
        self._start_watching()
        try:
            self.stop.install()
            try:
                while self.step < self.total_steps and not self.stopping:
                    self._run_epoch()
            finally:
                self.stop.uninstall()
            self.stopping = self.stop.finish() or self.stopping
            if self.stopping:
                self.save()
                log.warning("stopped by signal %d at step %d; checkpoint saved, continue with --resume latest",
                            self.stop.signal, self.step)
                return {}
            train_time = time.perf_counter() - started
            results = self.finish()
            self._write_run_report(start_step, train_time, time.perf_counter() - started)
            return results
        finally:
            self._stop_watching()

    @property
    def warmup_steps(self) -> int:
        optim = self.cfg.optim
        steps = round(optim.warmup_fraction * self.total_steps) if optim.warmup_fraction > 0 else optim.warmup_steps
        if steps * 2 > self.total_steps:
            log.warning("warmup is %d of the run's %d steps: the learning rate peaks after half the run; "
                        "for a short run set optim.warmup_fraction (e.g. 0.1)", steps, self.total_steps)
        return steps

    @property
    def contrastive_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.accum_steps * self.env.world_size

    def _start_watching(self) -> None:
        """The progress bar and the trackers of log.report_to, on rank 0."""
        bar = self.env.is_main and wants_bar(self.cfg.log.progress, self.env.world_size)
        self.progress = Progress(self.total_steps, self.step, bar)
        self.throughput.reset()
        self.metrics.printer = self.progress.write
        if self.env.is_main:
            self.metrics.trackers = build_trackers(self.cfg, self.run_dir)

    def _stop_watching(self) -> None:
        self.metrics.close()
        if self.progress is not None:
            self.progress.close()

    def _write_run_report(self, start_step: int, train_time: float, wall_time: float) -> None:
        """RUN/summary.json and RUN/curves.png: side products, so a failure is logged, never raised."""
        if not self.env.is_main:
            return
        steps = self.step - start_step
        totals = {"steps": self.step, "total_steps": self.total_steps, "epochs": self.step / self.steps_per_epoch,
                  "resumed_from_step": start_step, "contrastive_batch": self.contrastive_batch,
                  "train_time_s": train_time, "wall_time_s": wall_time,
                  "mean_samples_per_s": steps * self.contrastive_batch / train_time if train_time > 0 else 0.0,
                  "skipped_samples": self.skipped_samples, "skipped_steps": self.skipped_steps}
        try:
            write_summary(self.run_dir, totals)
            from ..plotting import plot_runs

            plot_runs([self.run_dir], self.run_dir / "curves.png")
        except Exception as err:  # noqa: BLE001 - the run itself is complete and saved
            log.error("could not write the run summary or curves: %s: %s", type(err).__name__, first_line(err))

    def _run_epoch(self) -> None:
        accum = self.cfg.train.accum_steps
        if self.step_in_epoch == 0:
            self.data_consumed = {}
        batches = self.data.epoch_batches(self.epoch, skip=self.step_in_epoch * accum, consumed=self.data_consumed)
        if self._pending_rng is not None:  # after the fast-forward, so what follows matches an uninterrupted run
            ckpt.set_rng_state(self._pending_rng)
            self._pending_rng = None
        for group in iter(lambda: list(itertools.islice(batches, accum)), []):
            if len(group) < accum:
                break
            self.phase = f"train step {self.step + 1}"
            # Each loader role's raw position after its latest batch: a checkpoint resumes from it.
            self.data_consumed.update(dict(b["position"] for b in group if "position" in b))
            self._after_step(self.train_step(group))
            self.stopping = self.stop.poll()
            if self.step >= self.total_steps or self.stopping:
                return
        self.epoch += 1
        self.step_in_epoch = 0

    def _after_step(self, metrics: dict) -> None:
        """Log, then checkpoint, then evaluate: a failing eval must never cost the checkpoint."""
        every_steps = self.cfg.checkpoint.every_steps
        self.skipped_samples += metrics.get("skipped", 0)
        if self.progress is not None:
            self.progress.step_done()
        self.throughput.add_step(metrics.pop("samples"), metrics.pop("step_s"))
        if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps or metrics.get("skipped_step"):
            timing = self.progress.fields(self.step) if self.progress is not None else {}
            self.metrics.write({"step": self.step, "epoch": self.epoch, **self._host_metrics(metrics),
                                **self.throughput.rates(), **timing})
            self.throughput.reset()
        side_task_started = time.perf_counter()
        if every_steps and self.step % every_steps == 0 and not metrics.get("skipped_step"):
            self.save()
        if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < self.total_steps:
            results = self.evaluate(retrieval=False)
            if results:
                self.metrics.write({"step": self.step, **results})
        self.throughput.pause(time.perf_counter() - side_task_started)

    def _host_metrics(self, metrics: dict) -> dict:
        """Logging steps only: the device values averaged over ranks and read once, plus the logit
        scale read from the fp32 master (the value training really uses)."""
        tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
        scale = master_weights.full_master(self.model.logit_scale, self.optimizer).reshape(()).exp()
        values = all_reduce_mean(torch.stack([v.detach().double().reshape(()) for v in tensors.values()]))
        plain = dict(zip(tensors, values.tolist()))  # the one host read of a logging step
        return {**{k: v for k, v in metrics.items() if k not in tensors}, **plain, "logit_scale": float(scale)}

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over ``accum_steps`` micro-batches; a non-finite step is skipped and counted."""
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        loss, metrics = self.forward_backward(micro_batches)
        applied = self._optimizer_step()
        if not applied:
            self._skip_step()
        samples = sum(b["text"].shape[0] for b in micro_batches) * self.env.world_size
        # Device tensors stay on the device: they are read on the host only on logging steps.
        return {**metrics, "loss": loss, "lr": lr, "samples": samples, "step_s": time.perf_counter() - started,
                "skipped": sum(b["skipped"] for b in micro_batches), "skipped_steps": self.skipped_steps,
                **({} if applied else {"skipped_step": True})}

    def forward_backward(self, micro_batches: list[dict]) -> tuple[torch.Tensor, dict]:
        """Loss over the whole contrastive batch, and its backward.

        Returns this rank's share of the full-batch loss and the term metrics, as device tensors
        (``_host_metrics`` averages them over ranks when a step is logged). A non-finite loss is
        back-propagated too: its gradients are non-finite, and the step is skipped on every rank
        by the gradient check (``_optimizer_step``), with no extra host read here.
        """
        if len(micro_batches) == 1:
            batch = micro_batches[0]
            loss, metrics = self.compute_loss(self._term_inputs(self.engine(*self._inputs(batch)), batch))
            self.engine.backward(loss)
            return loss.detach(), metrics
        loss, metrics = gradcache_backward(lambda batch: as_tuple(self.engine(*self._inputs(batch))),
                                           self._gradcache_loss, micro_batches,
                                           backward=self._gradcache_micro_backward, modules=self.model)
        return loss, metrics

    def compute_loss(self, inputs: TermInputs) -> tuple[torch.Tensor, dict]:
        return self.objective(inputs)

    def _gradcache_loss(self, *outputs):
        return self.compute_loss(_base_term_inputs(*outputs))

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

    # --- optimizer step and faults ---------------------------------------------------------------

    def _optimizer_step(self) -> bool:
        """Step unless the gradients are non-finite; returns whether the weights were updated.

        Under ZeRO-1/2/3, bf16 and fp16 the test is DeepSpeed's own, on the (partitioned) gradients
        (fp16: its loss scaler also lowers the scale); fp32 at ZeRO-0 has no DeepSpeed wrapper, so we
        test the global gradient norm: our only host read of a non-logging step (the gradients are
        already averaged over ranks, so every rank decides alike). That norm is also the one the
        gradient clipping needs, so we clip with it here and DeepSpeed does not clip again."""
        if not self.ds_checks_gradients and not self._clip_gradients_and_test_finite():
            self.engine.zero_grad()  # no optimizer step: weights, moments and the schedule stay as they were
            return False
        self.engine.step()
        if not self.engine.was_step_applied():
            after_skipped_step(self.optimizer)
            return False
        # CLIP clamps the learned temperature; in the fp32 master too, or the next copy-back undoes it.
        master_weights.clamp_(self.model.logit_scale, self.optimizer, 0.0, math.log(self.cfg.model.max_logit_scale))
        self.step += 1
        self.step_in_epoch += 1
        self.nonfinite_streak = 0
        return True

    def _clip_gradients_and_test_finite(self) -> bool:
        """fp32 at ZeRO-0: one global norm (a foreach pass), the clip with it (``optim.grad_clip``, as
        DeepSpeed's own: coefficient min(1, max / (norm + 1e-6))), then the finiteness of that norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return True
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.grad_clip:  # a non-finite norm makes the gradients NaN here: the step is skipped anyway
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)  # takes the parameters
        return bool(torch.isfinite(norm))

    def _skip_step(self) -> None:
        """Count a step whose update was skipped; the data it read is consumed all the same."""
        self.step += 1
        self.step_in_epoch += 1
        self.skipped_steps += 1
        if self.cfg.ds.precision == "fp16":
            # Overflow is how DeepSpeed's dynamic loss scaler finds its scale: expected, not a fault
            # (a scale that cannot go lower makes DeepSpeed itself stop the run).
            log.info("step %d skipped by the fp16 loss scaler (gradient overflow); %d skipped so far",
                     self.step, self.skipped_steps)
            return
        self.nonfinite_streak += 1
        log.warning("step %d skipped: non-finite loss or gradient; %d skipped so far", self.step, self.skipped_steps)
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite:
            raise TrainingError(f"{self.nonfinite_streak} consecutive steps had a non-finite loss or gradient "
                                f"(last at step {self.step}): lower optim.lr, check the data, or use ds.precision=fp32")

    def _full_weights(self):
        """Under ZeRO-3 the parameters are partitioned: gather them all (on every rank) for the eval,
        which reads whole tensors."""
        if self.cfg.ds.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    # --- evaluation, saving, export --------------------------------------------------------------

    def evaluate(self, retrieval: bool = True) -> dict:
        """Every rank evaluates its share of the eval sets, in the training precision; results are
        the same on every rank. An eval that fails is logged and the run goes on (a failed
        collective still ends the run: the ranks could no longer agree on anything). The final
        evaluation (retrieval=True) also writes eval.suite's results and reports to RUN/suite."""
        cfg = self.cfg.eval
        if not (cfg.zeroshot or cfg.suite or (retrieval and cfg.retrieval)):
            return {}
        self.phase = f"evaluation at step {self.step}"
        signal_dtype = None if self.compute_dtype == torch.float32 else self.compute_dtype
        try:
            with self._full_weights():
                results = run_training_eval(
                    self.model, self.built.eval_transform, self.built.tokenizer,
                    zeroshot_path=cfg.zeroshot or None,
                    retrieval_path=(cfg.retrieval or None) if retrieval else None,
                    device=self.device, batch_size=cfg.batch_size, workers=self.data.workers,
                    signal_dtype=signal_dtype, progress=self.progress is not None and self.progress.bar is not None)
                if cfg.suite:
                    from ..eval.suite import run_training_suite

                    results.update(run_training_suite(
                        self.model, self.built.eval_transform, self.built.tokenizer, cfg.suite, self.device,
                        cfg.batch_size, self.data.workers, signal_dtype,
                        out_dir=self.run_dir / "suite" if retrieval else None, model_label=str(self.run_dir)))
                return results
        except Exception as err:  # noqa: BLE001 - any eval failure; the checkpoint is already written
            if is_collective_failure(err):
                raise
            log.error("evaluation at step %d failed, training goes on: %s: %s", self.step, type(err).__name__,
                      first_line(err), exc_info=err)
            return {"eval_error": f"{type(err).__name__}: {first_line(err)}"}

    def model_info(self) -> dict:
        return {"model_cfg": self.built.model_cfg, "preprocess_cfg": jsonable(self.built.preprocess_cfg)}

    def master_weights(self) -> dict[str, torch.Tensor]:
        """The fp32 masters (every rank calls; complete on every rank)."""
        return master_weights.master_state_dict(self.model, self.optimizer)

    def save(self, weights: dict[str, torch.Tensor] | None = None) -> Path | None:
        """All ranks write their part into a partial directory; rank 0 adds the fp32 master weights
        (``weights.safetensors``, every stage and precision) and renames it into place."""
        self.phase = f"checkpoint at step {self.step}"
        weights = self.master_weights() if weights is None else weights
        if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            log.error("weights are not finite at step %d: not saving a checkpoint", self.step)
            return None
        tmp = ckpt.partial_dir(self.run_dir, self.step)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        # Under one key of our own: DeepSpeed keeps keys such as "skipped_steps" for itself.
        client_state = {"clip_train": {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                                       "skipped_steps": self.skipped_steps, "skipped_samples": self.skipped_samples}}
        self.engine.save_checkpoint(str(tmp), tag=ckpt.DS_TAG, client_state=client_state, save_latest=False)
        ckpt.write_rank_state(tmp, self.env.rank, {"epoch": self.epoch, "roles": self.data.roles,
                                                   "consumed": dict(self.data_consumed)})
        if self.env.is_main:
            ckpt.write_weights(tmp, weights)
        _barrier()
        final = ckpt.commit(self.run_dir, self.step, self.model_info(), self.cfg.checkpoint.keep) \
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
        self.skipped_samples = position.get("skipped_samples", 0)  # not in checkpoints of earlier versions
        self._pending_rng = ckpt.read_rank_state(path, self.env.rank)
        self.data_consumed = self._resumed_data_position(self._pending_rng.get("data_position"))
        if self.step_in_epoch >= self.steps_per_epoch:  # saved on an epoch's last step: start the next one
            self.epoch, self.step_in_epoch, self.data_consumed = self.epoch + 1, 0, {}
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", path, self.step, self.epoch, self.step_in_epoch)

    def _resumed_data_position(self, saved: dict | None) -> dict[int, int]:
        """Raw samples each loader role had delivered, if the checkpoint's roles are this run's roles."""
        if not saved or saved["epoch"] != self.epoch:
            return {}
        if saved["roles"] != self.data.roles:
            log.warning("the checkpoint read its data with %d loader worker(s), this run with %d: the rest of "
                        "epoch %d comes in another order than it would have", saved["roles"], self.data.roles,
                        self.epoch)
            return {}
        return {int(role): int(n) for role, n in saved["consumed"].items()}

    def export(self, weights: dict[str, torch.Tensor] | None = None, checkpoint: Path | None = None) -> None:
        """``RUN/export`` in open_clip's format, from the same fp32 masters as the checkpoint; with
        the checkpoint just saved, its weights file is linked, not written a second time."""
        self.phase = "export"
        weights = self.master_weights() if weights is None and checkpoint is None else weights
        if self.env.is_main:
            info = self.model_info()
            export_model(weights, info["model_cfg"], info["preprocess_cfg"], self.run_dir / "export",
                         weights_file=ckpt.weights_file(checkpoint) if checkpoint is not None else None)
        _barrier()

    def finish(self) -> dict:
        weights = self.master_weights()
        checkpoint = self.save(weights)  # rank 0: the checkpoint; None elsewhere, or if it was not saved
        self.export(weights, checkpoint)
        results = self.evaluate()
        if results:
            self.metrics.write({"step": self.step, **results})
        return {k: v for k, v in results.items() if isinstance(v, float)}


def _base_term_inputs(image_features, text_features, logit_scale, logit_bias=None) -> TermInputs:
    """The two embeddings and the 0-dim scale (and bias) the loss terms take; the model holds them as shape [1]."""
    return TermInputs(image_features, text_features, logit_scale.reshape(()),
                      None if logit_bias is None else logit_bias.reshape(()))


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
