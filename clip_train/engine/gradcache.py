"""GradCache: a contrastive batch larger than fits in memory, with the exact full-batch gradient.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
The batch of ``B = m k`` rows (per rank) is split into ``k`` micro-batches of ``m`` rows.
With ``f_i = F(x_i; theta)`` the model outputs of micro-batch ``i`` (image and text
features, plus the scalars logit scale ``s`` and, for SigLIP, bias ``t``) and ``L`` the
loss over the concatenated outputs, the chain rule splits the parameter gradient into
per-micro-batch terms that only need one micro-batch's activation graph at a time:

    dL/dtheta = sum_i (dL/df_i)^T  df_i/dtheta
              = sum_i d/dtheta [ sum_j <f_ij, g_ij> ]      with g_ij = dL/df_ij held constant.

The three passes:

1. *encode*: run every micro-batch forward without autograd and cache ``f_i``, saving the
   RNG state before each forward (so dropout / patch-dropout masks can be replayed);
2. *loss*: make the concatenated outputs leaf tensors, compute ``L`` and its gradient
   ``g = dL/df`` with respect to those leaves only (no parameter is touched);
3. *replay*: for each micro-batch restore its RNG state, run the forward again with
   autograd and back-propagate the surrogate ``sum_j <f_ij, g_ij>``, whose parameter
   gradient is that micro-batch's term above.  The scalars (``s``, ``t``) are the same
   tensors in every micro-batch, so their cached gradient enters one surrogate only (the
   last one; see :func:`surrogate_loss`); counting it ``k`` times would scale it by ``k``.

Even the scalars' gradient goes through the replayed forward rather than being added to
the parameters directly: DDP and DeepSpeed only reduce gradients that flow through the
wrapped module's forward.  The summed per-micro-batch terms equal the full-batch gradient
up to floating-point summation order; in a distributed run the loss pass is itself
collective (ring across ranks), so every rank must call this with the same ``k``.

Train/eval mode is never changed here: the encode and the replay run in whatever mode the
caller's model is in, so dropout is either active in both or in neither.  BatchNorm layers in
training mode therefore update their running statistics in both passes, ``2 k`` times from
micro-batches; given the model (``modules=``), the step ends with the buffers one update from
the whole batch would give (:mod:`.batchnorm_stats`, which also explains why the forward
normalisation itself still uses per-micro-batch statistics).
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch

from .batchnorm_stats import BatchNormStatsRecorder

Forward = Callable[[dict], Sequence[torch.Tensor]]
LossFn = Callable[..., tuple]
Backward = Callable[[torch.Tensor, bool], None]
ReplayContext = Callable[[bool], ContextManager]

N_FEATURE_OUTPUTS = 2
"""Leading outputs that are per-row features (image, text); the rest are shared scalars."""


# --- RNG capture / replay -----------------------------------------------------------------


@dataclass(frozen=True)
class RngState:
    """The random state a forward may draw from: the CPU generator and, when CUDA is in
    use, the generator of the current CUDA device."""

    cpu: torch.Tensor
    cuda: Optional[torch.Tensor] = None
    cuda_device: Optional[int] = None


def capture_rng_state() -> RngState:
    """Snapshot the CPU and current-device CUDA generators.  CUDA is only read when it has
    already been initialised: a CPU-only run must not start a CUDA context."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        return RngState(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
    return RngState(torch.get_rng_state())


def restore_rng_state(state: RngState) -> None:
    """Put the generators back to ``state`` (as captured by :func:`capture_rng_state`)."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, state.cuda_device)


# --- the three passes ---------------------------------------------------------------------


@dataclass
class CachedOutputs:
    """Pass-1 result: the detached outputs of every micro-batch and the RNG state that
    preceded each micro-batch's forward."""

    features: list  # per output index < N_FEATURE_OUTPUTS: the concatenation over micro-batches
    scalars: list  # the shared scalar outputs, taken from the first micro-batch
    rows: list  # rows contributed by each micro-batch (to split the cached gradients again)
    rng_states: list


def split_outputs(outputs: Sequence[torch.Tensor]) -> tuple[list, list]:
    """``(features, scalars)`` of one forward's outputs tuple, with a clear error if the
    forward does not return at least the image and text features."""
    outputs = list(outputs)
    if len(outputs) < N_FEATURE_OUTPUTS:
        raise ValueError(
            f"forward must return (image_features, text_features, *scalars); got {len(outputs)} output(s)"
        )
    return outputs[:N_FEATURE_OUTPUTS], outputs[N_FEATURE_OUTPUTS:]


def encode_without_grad(forward: Forward, micro_batches: Sequence[dict]) -> CachedOutputs:
    """Pass 1: every micro-batch forward under ``torch.no_grad`` (no activations kept)."""
    per_batch_features, rng_states, scalars = [], [], None
    with torch.no_grad():
        for micro_batch in micro_batches:
            rng_states.append(capture_rng_state())
            features, batch_scalars = split_outputs(forward(micro_batch))
            per_batch_features.append([f.detach() for f in features])
            if scalars is None:
                scalars = [s.detach() for s in batch_scalars]
            else:
                check_same_scalars(scalars, batch_scalars)
    features = [torch.cat(column) for column in zip(*per_batch_features)]
    rows = [f[0].shape[0] for f in per_batch_features]
    return CachedOutputs(features, scalars, rows, rng_states)


def check_same_scalars(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> None:
    """The scalar outputs are model parameters (or functions of them), identical for every
    micro-batch; anything else would make "count them once" wrong, so refuse it. On an
    accelerator only their number and shapes are compared: reading the values on the host would
    stall the device once per micro-batch."""
    same = len(expected) == len(got) and all(e.shape == g.shape for e, g in zip(expected, got))
    if same and all(e.device.type == "cpu" for e in expected):
        same = all(torch.equal(e, g) for e, g in zip(expected, got))
    if not same:
        raise ValueError("the scalar outputs (logit scale / bias) differ between micro-batches")


def loss_and_output_gradients(loss_fn: LossFn, cached: CachedOutputs):
    """Pass 2: the loss over the whole (cached) batch and its gradient w.r.t. the outputs.

    ``torch.autograd.grad`` on fresh leaves: nothing accumulates into any ``.grad`` and no
    model parameter is part of this graph.  Returns ``(loss, metrics, feature_grads,
    scalar_grads)``; an output the loss does not depend on gets a zero gradient.
    """
    feature_leaves = [f.requires_grad_() for f in cached.features]
    scalar_leaves = [s.clone().requires_grad_() for s in cached.scalars]
    leaves = feature_leaves + scalar_leaves
    loss, metrics = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return loss.detach(), metrics, grads[:N_FEATURE_OUTPUTS], grads[N_FEATURE_OUTPUTS:]


def surrogate_loss(outputs: Sequence[torch.Tensor], feature_grads: Sequence[torch.Tensor],
                   scalar_grads: Sequence[torch.Tensor], include_scalars: bool) -> torch.Tensor:
    """``sum_j <f_j, g_j>``: its gradient w.r.t. the parameters is ``(df/dtheta)^T g``.

    The shared scalars' cached gradient is used in one surrogate only
    (``include_scalars``), so it counts once; in the others they enter with weight zero.
    That zero term adds exactly 0 to their gradient but makes every parameter take part in
    every backward: DDP with ``find_unused_parameters=False`` fails ("Expected to have
    finished reduction") if a synchronised backward leaves a parameter without gradient,
    and ZeRO stages that reduce on every micro-step expect the same.
    """
    features, scalars = split_outputs(outputs)
    terms = [(f * g.to(f.dtype)).sum() for f, g in zip(features, feature_grads)]
    weight = 1.0 if include_scalars else 0.0
    terms += [(s * (weight * g).to(s.dtype)).sum() for s, g in zip(scalars, scalar_grads)]
    # Python sum, not torch.stack: under autocast the features and scalars may differ in dtype.
    return sum(terms[1:], terms[0])


def check_replay_shapes(outputs: Sequence[torch.Tensor], feature_grads: Sequence[torch.Tensor]) -> None:
    features, _ = split_outputs(outputs)
    for f, g in zip(features, feature_grads):
        if f.shape != g.shape:
            raise RuntimeError(
                f"replayed forward returned shape {tuple(f.shape)} but the cached one was {tuple(g.shape)}"
            )


def replay_with_cached_gradients(forward: Forward, micro_batches: Sequence[dict], cached: CachedOutputs,
                                 feature_grads, scalar_grads, backward: Backward,
                                 replay_context: ReplayContext) -> None:
    """Pass 3: re-run each forward with autograd under its saved RNG state and
    back-propagate its surrogate through the caller's ``backward``.

    On return the RNG generators hold the state right after the last replayed forward,
    i.e. where one plain pass over the micro-batches would have left them (the replays
    re-draw exactly the encode pass's numbers), so the next step draws fresh randomness
    and anything ``backward`` consumed is not counted.
    """
    grads_per_batch = [torch.split(g, cached.rows) for g in feature_grads]
    last = len(micro_batches) - 1
    state_after_last_forward = None
    for i, micro_batch in enumerate(micro_batches):
        is_last = i == last
        with replay_context(is_last):
            restore_rng_state(cached.rng_states[i])
            outputs = forward(micro_batch)
            if is_last:
                state_after_last_forward = capture_rng_state()
            batch_grads = [g[i] for g in grads_per_batch]
            check_replay_shapes(outputs, batch_grads)
            surrogate = surrogate_loss(outputs, batch_grads, scalar_grads, include_scalars=is_last)
            del outputs  # the graph lives on through `surrogate` only until backward frees it
            backward(surrogate, is_last)
    restore_rng_state(state_after_last_forward)


# --- public API ---------------------------------------------------------------------------


def default_backward(surrogate: torch.Tensor, is_last: bool) -> None:
    """Plain autograd: gradients accumulate into the parameters' ``.grad``."""
    surrogate.backward()


def no_context(is_last: bool) -> ContextManager:
    return contextlib.nullcontext()


def gradcache_backward(
    forward: Forward,
    loss_fn: LossFn,
    micro_batches: Sequence[dict],
    backward: Optional[Backward] = None,
    replay_context: Optional[ReplayContext] = None,
    *,
    modules: Optional[torch.nn.Module] = None,
) -> tuple[torch.Tensor, dict]:
    """Accumulate into the parameters the gradient of the loss over all ``micro_batches``
    at once, keeping only one micro-batch's activations alive at a time.

    Args:
        forward: ``forward(micro_batch) -> (image_features, text_features, *scalars)``;
            the features are per-row and concatenated along dim 0 in micro-batch order;
            the scalars (logit scale, bias) must be the same for every micro-batch.
        loss_fn: ``loss_fn(image_features, text_features, *scalars) -> (loss, metrics)``.
        micro_batches: the batch split into ``k >= 1`` parts (see :func:`split_batch`).
        backward: ``backward(surrogate, is_last)`` back-propagates one scalar; called
            once per micro-batch, ``is_last`` true on the final call.  Default
            ``surrogate.backward()``.  With a DeepSpeed engine:
            ``engine.backward(surrogate, scale_wrt_gas=False)`` (the surrogates already
            sum to the full-batch gradient; nothing must be divided by ``k``).
        replay_context: ``replay_context(is_last)`` returns a context manager entered
            around each replayed forward *and* its backward.  For DDP pass
            ``lambda last: nullcontext() if last else ddp.no_sync()``: DDP decides at
            forward time whether the following backward all-reduces, so ``no_sync`` must
            cover the forward too; then gradients are reduced once, on the last backward.
        modules: the model ``forward`` runs (for DeepSpeed ``engine.module``; a DDP wrapper
            or the bare model also work).  Its BatchNorm layers in training mode then end
            the step with one running-statistics update from all micro-batches' rows
            instead of ``2 k`` updates from ``m`` rows each (see :mod:`.batchnorm_stats`).
            ``None``: buffers are left as the passes wrote them.  Unused with one
            micro-batch, whose plain forward already updates them once.

    Returns ``(loss.detach(), metrics)`` of the whole-batch loss.  With one micro-batch it
    is a plain forward + ``backward(loss, True)`` (same result, no second forward).  The
    RNG state on return is the one after the last micro-batch's forward (see
    :func:`replay_with_cached_gradients`).
    """
    if len(micro_batches) == 0:
        raise ValueError("gradcache_backward needs at least one micro-batch")
    backward = backward or default_backward
    replay_context = replay_context or no_context
    if len(micro_batches) == 1:
        with replay_context(True):
            loss, metrics = loss_fn(*forward(micro_batches[0]))
            backward(loss, True)
        return loss.detach(), metrics
    batchnorm = BatchNormStatsRecorder(modules)
    with batchnorm.recording():  # the encode pass only: it sees the same inputs as the replays
        cached = encode_without_grad(batchnorm.per_micro_batch(forward), micro_batches)
    loss, metrics, feature_grads, scalar_grads = loss_and_output_gradients(loss_fn, cached)
    cached.features = []  # the cached features are no longer needed during the replays
    replay_with_cached_gradients(forward, micro_batches, cached, feature_grads, scalar_grads,
                                 backward, replay_context)
    # Last, so it also overrides the replays' (and any checkpoint recompute's) updates.
    batchnorm.write_full_batch_update()
    return loss, metrics


def split_batch(batch: dict, k: int) -> list[dict]:
    """Split a batch dict into ``k`` micro-batches of equal size, in order.

    * tensors with a batch dimension, and lists/tuples of per-sample items, are split
      along dim 0 into ``k`` consecutive equal parts;
    * counters (Python numbers and 0-d tensors, e.g. ``"skipped": int``) stay whole in
      the first micro-batch and are zero in the others, so summing a counter over the
      micro-batches gives the batch's value and every micro-batch has the same keys.

    Raises ``ValueError`` if ``k < 1``, if the per-sample entries disagree on the batch
    size or it is not divisible by ``k``; ``TypeError`` for a value of another type.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (micro-batches per batch) must be a positive integer, got {k!r}")
    size = batch_size(batch)
    if size % k:
        raise ValueError(
            f"batch size {size} is not divisible by {k} micro-batches; make the batch size a multiple "
            "of the micro-batch count"
        )
    micro = size // k
    parts = [dict() for _ in range(k)]
    for key, value in batch.items():
        if is_counter(value):
            for i, part in enumerate(parts):
                part[key] = value if i == 0 else zero_like(value)
        else:
            for i, part in enumerate(parts):
                part[key] = value[i * micro:(i + 1) * micro]
    return parts


def is_counter(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def zero_like(value):
    return torch.zeros_like(value) if isinstance(value, torch.Tensor) else type(value)(0)


def batch_size(batch: dict) -> int:
    """The common length of the per-sample entries (tensors with a batch dim, lists, tuples)."""
    sizes = {}
    for key, value in batch.items():
        if is_counter(value):
            continue
        if not isinstance(value, (torch.Tensor, list, tuple)):
            raise TypeError(
                f"cannot split batch entry {key!r} of type {type(value).__name__}: expected a tensor, "
                "a list/tuple of per-sample items, or a number"
            )
        sizes[key] = len(value)
    if not sizes:
        raise ValueError("batch has no per-sample entries (tensors, lists) to split")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch entries disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))
