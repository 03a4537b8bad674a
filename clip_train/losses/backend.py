"""Which implementation runs the tiles of the softmax / sigmoid losses, and their default sizes.

``backend`` (``loss.backend``): ``torch`` loops over ``T x T`` tiles with torch ops (the
reference, and the CPU default); ``triton`` runs the fused kernels of ``triton_tiles`` (one
launch per ring step, nothing ``T x T`` in memory); ``auto`` is ``triton`` for float32 / bf16 /
fp16 CUDA tensors when Triton imports, else ``torch``.  The choice only changes how one block
pair is computed: the exchange (``ring.py``), the maths and the gradient convention are shared.

Nothing here imports Triton at module level: CPU users never pay for it, and
``TRITON_INTERPRET=1`` must be set before the kernels are defined, which happens on first use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")
"""Valid values of ``backend`` (``loss.backend`` in the config)."""
CPU_TILE_SIZE = 1024
"""The torch backend's tile edge on CPU (unchanged since the tiled losses were written)."""
CUDA_TILE_SIZE = 2048
"""The torch backend's tile edge on CUDA.  PROVISIONAL, not measured yet: a 2048² float32 tile
is 16 MiB and the backward holds about three, which keeps the tiles small next to open_clip's
B² logits from B = 8k on, with matmuls large enough to fill an H100.
``benchmarks/gpu_loss.py --tile-sweep`` measures the alternatives; replace this with its result."""
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for features ``x``; a bad request fails with one clear line."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        fused = x.device.type == "cuda" and x.dtype in _FUSED_DTYPES
        return "triton" if fused and triton_importable() else "torch"
    if not triton_importable():
        raise ValueError("backend='triton' needs the triton package: pip install triton (or use backend='torch')")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got {x.device.type}: use backend='torch' or 'auto' "
                         "(or set TRITON_INTERPRET=1 for Triton's slow CPU interpreter)")
    return "triton"


def default_tile_size(device: torch.device, dim: int, dtype: torch.dtype) -> int:
    """The torch backend's tile edge when ``tile_size`` is not given: :data:`CPU_TILE_SIZE` on
    CPU, :data:`CUDA_TILE_SIZE` on CUDA (same for every ``dim`` / ``dtype`` until the GPU sweep
    says otherwise: the tile's memory, ``T²`` statistics-dtype floats, does not depend on them).
    The triton backend has no ``T x T`` tile: it uses :func:`triton_blocks`."""
    return CUDA_TILE_SIZE if torch.device(device).type == "cuda" else CPU_TILE_SIZE


@dataclass(frozen=True)
class TritonBlocks:
    """Block sizes of the fused kernels (powers of two, at least 16: ``tl.dot``'s minimum)."""

    m: int
    """Rows of ``x`` per program."""
    n: int
    """Columns (rows of ``y``) per inner step."""
    d: int
    """Feature chunk of the ``S = s x y^T`` products."""
    do: int
    """Feature chunk of the gradient output per program (``BLOCK_M x do`` accumulator)."""
    min_programs: int
    """Split the columns into groups until the grid has at least this many programs."""


def _pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))


def triton_blocks(device: torch.device, dim: int, dtype: torch.dtype) -> TritonBlocks:
    """Block sizes per device.  CPU (the interpreter, for tests): 16 everywhere, so tiny test
    shapes already have ragged row, column and feature edges, and a few column groups.
    CUDA: PROVISIONAL (not measured): 64 x 64 tiles with 64-wide (32 for float32: shared memory)
    feature chunks, gradient chunks of up to 256 features, and two programs per SM;
    ``benchmarks/gpu_loss.py`` is the place to tune them."""
    device = torch.device(device)
    if device.type != "cuda":
        return TritonBlocks(16, 16, 16, 16, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    d = 32 if dtype == torch.float32 else 64
    return TritonBlocks(64, 64, min(d, _pow2(dim)), _pow2(dim, hi=256), 2 * sms)
