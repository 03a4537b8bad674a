"""Fused Triton kernels for one (row block, column block) pair of the tiled softmax / sigmoid losses.

They replace the per-tile Python loops of ``tiled_softmax._lse_tiles`` / ``_grad_tiles`` and
``tiled_sigmoid._softplus_tiles`` / ``_grad_tiles`` with the same maths and the same in-place
contract, so ``ring.ring_loop`` (and the distributed gradient convention) is unchanged: each
ring step launches a few kernels instead of looping over ``T x T`` tiles.

Two kernels serve both losses, because both are symmetric in the two towers: with
``S = s x y^T`` the column statistics of ``S`` are the row statistics of ``S^T = s y x^T``, and
the text gradient is the image gradient with the roles swapped.

* ``_row_stats_kernel``: for each row ``i`` of ``x``, over one group of columns of ``y``, the
  log-sum-exp of ``S_i.`` (softmax; streaming max/sum as in flash attention) or the sum of
  ``softplus(S_i. + t)`` (sigmoid).  Column groups give the GPU enough programs when ``x`` has
  few rows; their partial results are merged on the host (``O(n x groups)`` values).
* ``_row_grad_kernel``: ``out_i += sum_j G_ij y_j`` with ``G`` recomputed from ``S``:
  ``c_x exp(S_ij - lse_x_i) + c_y exp(S_ij - lse_y_j)`` (softmax) or ``c sigmoid(S_ij + t)``
  (sigmoid, which also returns ``sum_ij sigmoid``).  Programs split the output's ``D`` into
  ``BLOCK_DO`` chunks (an accumulator of ``BLOCK_M x D`` floats may not fit in registers).

Recomputing ``S`` once per direction costs two extra ``a b^T`` products per step (6 instead of
4 matmul-sized passes) but nothing ``T x T`` ever reaches memory: the torch path writes and
reads every tile about ten times for its element-wise ops, which is what bounds it on a GPU.
Every reduction, exponential and accumulator is in the statistics dtype (float32 for
bf16/fp16 inputs, else the input dtype); products of features accumulate in it too.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU
tensors in Triton's interpreter: slow, for the parity tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import TritonBlocks, triton_blocks

@triton.jit
def _dot(u, v, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + u @ v`` accumulated in ``acc``'s dtype.  ``UPCAST``: Triton 3.8's interpreter
    multiplies bf16/fp16 operands as raw integers, so there they are widened first (exact: the
    products of two half-precision numbers are exact in float32, as on tensor cores)."""
    if UPCAST:
        u, v = u.to(acc.dtype), v.to(acc.dtype)
    return tl.dot(u, v, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _logits(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_x, stride_y, s,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr):
    """``s x[rows] y[cols]^T`` for one ``BLOCK_M x BLOCK_N`` tile, over ``D`` in ``BLOCK_D`` chunks
    (masked loads read 0 past the ragged edges, which adds nothing to the dot products)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=s.dtype)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xa = tl.load(x_ptr + rows[:, None] * stride_x + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        yb = tl.load(y_ptr + cols[:, None] * stride_y + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(xa, tl.trans(yb), acc, PRECISION, UPCAST)
    return acc * s


@triton.jit
def _row_stats_kernel(x_ptr, y_ptr, out_ptr, s_ptr, t_ptr, n_x, n_y, D, stride_x, stride_y, cols_per_group,
                      SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``out[g, i]`` = logsumexp (softmax) or sum of softplus(. + t) (sigmoid) of ``S[i, group g]``."""
    pid_m, g = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_x
    s = tl.load(s_ptr).to(out_ptr.dtype.element_ty)
    t = tl.load(t_ptr).to(out_ptr.dtype.element_ty)
    # Online log-sum-exp: running max m and sum l of exp(S - m); for the sigmoid l is the sum.
    m = tl.full((BLOCK_M,), float("-inf"), dtype=s.dtype)
    l = tl.zeros((BLOCK_M,), dtype=s.dtype)
    j_start = g * cols_per_group
    j_end = tl.minimum(j_start + cols_per_group, n_y)
    for j0 in range(j_start, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < j_end
        S = _logits(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_x, stride_y, s,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        if SIGMOID:
            z = S + t
            # softplus(z) = max(z, 0) + log(1 + exp(-|z|)): never overflows.
            sp = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
            l += tl.sum(tl.where(col_ok[None, :], sp, 0.0), axis=1)
        else:
            S = tl.where(col_ok[None, :], S, float("-inf"))
            m_new = tl.maximum(m, tl.max(S, axis=1))  # finite: every group has a valid column
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(S - m_new[:, None]), axis=1)
            m = m_new
    res = l if SIGMOID else m + tl.log(l)
    tl.store(out_ptr + g * n_x + rows, res, mask=row_ok)


@triton.jit
def _row_grad_kernel(x_ptr, y_ptr, lse_x_ptr, lse_y_ptr, c_x_ptr, c_y_ptr, s_ptr, t_ptr, out_ptr, psum_ptr,
                     n_x, n_y, D, stride_x, stride_y, cols_per_group,
                     SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr):
    """``out[g, i, dchunk] = sum_{j in group g} G_ij y_j[dchunk]``; sigmoid: ``psum[g, pid_m] = sum G / c``."""
    pid_m, pid_d, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_x
    st = out_ptr.dtype.element_ty
    s = tl.load(s_ptr).to(st)
    t = tl.load(t_ptr).to(st)
    c_x = tl.load(c_x_ptr).to(st)
    c_y = tl.load(c_y_ptr).to(st)
    lse_x = tl.load(lse_x_ptr + rows, mask=row_ok, other=0.0).to(st)
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dout < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=st)
    p_sum = tl.zeros((BLOCK_M,), dtype=st)
    j_start = g * cols_per_group
    j_end = tl.minimum(j_start + cols_per_group, n_y)
    for j0 in range(j_start, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < j_end
        S = _logits(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_x, stride_y, s,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        ok = row_ok[:, None] & col_ok[None, :]
        if SIGMOID:
            P = tl.where(ok, tl.sigmoid(S + t), 0.0)
            p_sum += tl.sum(P, axis=1)
            G = c_x * P
        else:
            lse_y = tl.load(lse_y_ptr + cols, mask=col_ok, other=0.0).to(st)
            G = c_x * tl.exp(S - lse_x[:, None]) + c_y * tl.exp(S - lse_y[None, :])
            G = tl.where(ok, G, 0.0)
        yd = tl.load(y_ptr + cols[:, None] * stride_y + dout[None, :], mask=col_ok[:, None] & dout_ok[None, :],
                     other=0.0)
        # G in the features' dtype for the product, as the torch path does (bf16 tensor cores).
        acc = _dot(G.to(yd.dtype), yd, acc, PRECISION, UPCAST)
    out = out_ptr + (g * n_x + rows[:, None]) * D + dout[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & dout_ok[None, :])
    if SIGMOID:
        if pid_d == 0:
            tl.store(psum_ptr + g * tl.num_programs(0) + pid_m, tl.sum(p_sum, axis=0))


INTERPRETED = isinstance(_row_stats_kernel, triton.runtime.interpreter.InterpretedFunction)
"""Whether these kernels were defined under ``TRITON_INTERPRET=1`` (fixed at import time)."""


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "clip_train.losses.triton_tiles is first imported")


def _rows_ready(x: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by a stride and elements contiguously (ring views qualify)."""
    return x if x.dim() == 2 and x.stride(1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    """fp32 products as torch does them: TF32 only where the user allowed it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype in (torch.bfloat16, torch.float16)


def _groups(n_x: int, n_y: int, programs: int, blk: TritonBlocks) -> tuple[int, int]:
    """``(column groups, columns per group)``: enough groups that the grid has at least
    ``blk.min_programs`` programs; every group holds at least one column."""
    n_col_blocks = triton.cdiv(n_y, blk.n)
    groups = max(1, min(n_col_blocks, triton.cdiv(blk.min_programs, programs)))
    per_group = triton.cdiv(n_col_blocks, groups) * blk.n
    return triton.cdiv(n_y, per_group), per_group


def row_stats(x, y, s, st, t=None, blk: TritonBlocks | None = None) -> torch.Tensor:
    """``(groups, n_x)`` partial row statistics of ``S = s x y^T``: logsumexp (``t is None``) or
    softplus sums of ``S + t``."""
    _check_device(x)
    x, y = _rows_ready(x), _rows_ready(y)
    (n_x, D), n_y = x.shape, y.shape[0]
    blk = blk or triton_blocks(x.device, D, x.dtype)
    grid_m = triton.cdiv(n_x, blk.m)
    groups, per_group = _groups(n_x, n_y, grid_m, blk)
    out = torch.empty((groups, n_x), dtype=st, device=x.device)
    _row_stats_kernel[(grid_m, groups)](
        x, y, out, s, s if t is None else t, n_x, n_y, D, x.stride(0), y.stride(0), per_group,
        SIGMOID=t is not None, BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_D=blk.d, PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype))
    return out


def row_grad(x, y, s, lse_x, lse_y, c_x, c_y, st, t=None, blk: TritonBlocks | None = None):
    """``(sum_j G_ij y_j)_i`` as an ``(n_x, D)`` tensor in ``st``, and (sigmoid) ``sum_ij sigmoid``.
    Softmax: ``t is None`` and ``G = c_x P^row + c_y P^col``; sigmoid: ``G = c_x sigmoid(S + t)``."""
    _check_device(x)
    x, y = _rows_ready(x), _rows_ready(y)
    (n_x, D), n_y = x.shape, y.shape[0]
    blk = blk or triton_blocks(x.device, D, x.dtype)
    grid_m, grid_d = triton.cdiv(n_x, blk.m), triton.cdiv(D, blk.do)
    groups, per_group = _groups(n_x, n_y, grid_m * grid_d, blk)
    out = torch.empty((groups, n_x, D), dtype=st, device=x.device)
    psum = torch.zeros((groups, grid_m), dtype=st, device=x.device)
    sigmoid = t is not None
    lse_x = s if sigmoid else lse_x.to(st).contiguous()  # the sigmoid kernel reads no lse
    lse_y = s if sigmoid else lse_y.to(st).contiguous()
    _row_grad_kernel[(grid_m, grid_d, groups)](
        x, y, lse_x, lse_y, c_x, c_x if c_y is None else c_y, s, s if t is None else t, out, psum,
        n_x, n_y, D, x.stride(0), y.stride(0), per_group, SIGMOID=sigmoid, BLOCK_M=blk.m, BLOCK_N=blk.n,
        BLOCK_D=blk.d, BLOCK_DO=blk.do, PRECISION=_precision(x.dtype), UPCAST=_upcast(x.dtype))
    return (out[0] if groups == 1 else out.sum(0)), psum.sum()


def _scalar(x, st) -> torch.Tensor:
    """A 0-dim device tensor the kernels can load (a Python number becomes one)."""
    return x.to(st).reshape(()) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=st)


# The per-block tile functions, with the signatures and in-place contract of the torch ones.

def softmax_lse_tiles(a, b, s, row_lse, col_lse, blk=None):
    """Merge the row/column log-sum-exp of ``S = s a b^T`` into the running statistics."""
    st = row_lse.dtype
    s = _scalar(s, st).to(a.device)
    torch.logaddexp(row_lse, row_stats(a, b, s, st, blk=blk).logsumexp(0), out=row_lse)
    col_lse.copy_(torch.logaddexp(col_lse, row_stats(b, a, s, st, blk=blk).logsumexp(0)))


def softmax_grad_tiles(a, b, s, row_lse, col_lse, c_row, c_col, ga_u, gb_u, blk=None):
    """``ga_u += G b``, ``gb_u += G^T a`` with ``G = c_row P^row + c_col P^col`` (no factor s)."""
    st = ga_u.dtype
    s, c_row, c_col = (_scalar(x, st).to(a.device) for x in (s, c_row, c_col))
    ga_u.add_(row_grad(a, b, s, row_lse, col_lse, c_row, c_col, st, blk=blk)[0])
    gb_u.add_(row_grad(b, a, s, col_lse, row_lse, c_col, c_row, st, blk=blk)[0])


def sigmoid_softplus_tiles(a, b, s, t, out, blk=None):
    """``out += sum softplus(s a b^T + t)``."""
    st = out.dtype
    s, t = _scalar(s, st).to(a.device), _scalar(t, st).to(a.device)
    out += row_stats(a, b, s, st, t=t, blk=blk).sum()


def sigmoid_grad_tiles(a, b, s, t, c, ga_u, gb_u, sig_sum, blk=None):
    """With ``P = sigmoid(S + t)``: ``ga_u += c P b``, ``gb_u += c P^T a``, ``sig_sum += sum P``."""
    st = ga_u.dtype
    s, t, c = (_scalar(x, st).to(a.device) for x in (s, t, c))
    ga, p_sum = row_grad(a, b, s, None, None, c, None, st, t=t, blk=blk)
    ga_u.add_(ga)
    gb_u.add_(row_grad(b, a, s, None, None, c, None, st, t=t, blk=blk)[0])
    sig_sum += p_sum
