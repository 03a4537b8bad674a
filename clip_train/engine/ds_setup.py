"""DeepSpeed: the ds_config generated from our YAML, process-group setup, and ``deepspeed.initialize``."""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from pathlib import Path

import torch

from ..config import deep_merge
from .distributed import DistEnv

log = logging.getLogger(__name__)


class LaunchEnvError(ValueError):
    """The launch environment lacks what the process group needs; the message says what to set."""


def build_ds_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config for ``cfg`` (a ``Config``), with ``ds.config_file`` merged over it."""
    ds = cfg.ds
    micro, accum = cfg.data.batch_size, cfg.train.accum_steps
    zero = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size, "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": True}
    generated = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": ds.initial_scale_power},
        # We pass a torch AdamW: ZeRO works with it, and it avoids compiling DeepSpeed's fused Adam on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log our own metrics
        "wall_clock_breakdown": False,
        # Its throughput timer synchronises the accelerator at every forward and step (a pipeline
        # stall per step on a GPU); we time steps ourselves.
        "timers": {"throughput": {"enabled": False}},
    }
    if ds.config_file:
        generated = deep_merge(generated, json.loads(Path(ds.config_file).read_text()))
    return generated


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_launch_env(env: DistEnv) -> None:
    """What the process group will need from the launch environment (also checked at load time)."""
    if env.launcher == "slurm" and "MASTER_ADDR" not in os.environ:
        raise LaunchEnvError("SLURM launch without MASTER_ADDR: export MASTER_ADDR and MASTER_PORT in the sbatch script")


def init_distributed(env: DistEnv, device: torch.device, timeout_s: int) -> None:
    """Start the process group DeepSpeed needs, also for a single process without a launcher."""
    import deepspeed

    init_method = None
    if env.launcher == "none":
        # No launcher: a one-process group on a free local port, passed explicitly rather than through
        # MASTER_PORT so that processes this one starts (tests, tools) don't inherit a port in use.
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set
    elif env.launcher == "slurm":
        check_launch_env(env)
        for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
            os.environ.setdefault(name, str(value))  # srun sets only SLURM_*
    if device.type == "cpu":
        # DeepSpeed compiles a shared-memory all-reduce op for CPU (about a minute) that only its
        # inference path uses; training on CPU goes through gloo, so skip the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s), init_method=init_method,
                               rank=env.rank, world_size=env.world_size)


def _enabled(ds_config: dict, *sections: str) -> bool:
    return any(isinstance(ds_config.get(s), dict) and ds_config[s].get("enabled", False) for s in sections)


def caller_clips(ds_config: dict) -> bool:
    """Plain fp32 at ZeRO-0: no DeepSpeed optimizer wrapper, so DeepSpeed itself would clip the
    gradients (``clip_fp32_gradients``: a per-tensor norm loop and a per-tensor scale) after the
    trainer already computed the global norm for its non-finite test. There the trainer clips with
    that norm and DeepSpeed is told not to clip; every other stage and precision clips in
    DeepSpeed's optimizer, which also tests the norm."""
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    return (ds_config.get("gradient_clipping", 0.0) > 0 and zero == 0
            and not _enabled(ds_config, "bf16", "bfloat16", "fp16", "torch_autocast"))


def initialize(model: torch.nn.Module, optimizer, scheduler, ds_config: dict):
    """``deepspeed.initialize`` with our optimizer and schedule; logs the resolved config.

    Returns ``(engine, optimizer, scheduler, clip)``: ``clip`` is the gradient-norm limit the caller
    applies itself before ``engine.step()`` (0.0: DeepSpeed clips, or nobody does; see ``caller_clips``)."""
    import deepspeed

    clip = float(ds_config["gradient_clipping"]) if caller_clips(ds_config) else 0.0
    engine_config = {**ds_config, "gradient_clipping": 0.0} if clip else ds_config
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=engine_config, dist_init_required=False)
    if clip and (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled()
                 or getattr(engine, "torch_autocast_z0_gradscaler", None) is not None):
        raise RuntimeError("DeepSpeed wrapped the optimizer although the config reads as plain fp32 at ZeRO-0: "
                           "the trainer would clip gradients it should not touch")
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1 and engine.world_size == 1:
        # One process: ZeRO-0's backward all-reduce is an identity that still flattens every
        # gradient into one buffer, scales it by 1, all-reduces it over gloo/NCCL with itself and
        # copies it back (about 3 passes over the gradients per step). ZeRO-1/2/3 reduce inside
        # their optimizer (they need it to fill their partitions) and keep theirs.
        engine.enable_backward_allreduce = False
    log.debug("DeepSpeed config (also in RUN/ds_config.json): %s", json.dumps(engine_config, sort_keys=True))
    return engine, ds_optimizer, ds_scheduler, clip


def after_skipped_step(optimizer) -> None:
    """Put ZeRO-3 back in its between-steps state after DeepSpeed skipped a non-finite step.

    DeepSpeed 0.19's ZeRO-3 ``step`` partitions every parameter first and, on overflow, returns
    before its ``_post_step``, which all-gathers the small "persistent" parameters again. The next
    forward then has to fetch parameters that its recorded trace does not list and fails with
    "tracing error ... expected the next N parameters". Gathering them here is what ``_post_step``
    would have done (a collective: every rank skips the same step)."""
    persistent = getattr(optimizer, "persistent_parameters", None)
    if persistent:
        persistent[0].all_gather(persistent)
