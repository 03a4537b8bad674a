"""Loss-only forward + backward on one GPU: ours (torch and triton backends) vs open_clip and Inf-CL.

    python benchmarks/gpu_loss.py                       # the full sweep (one H100/H200, < 8 min)
    python benchmarks/gpu_loss.py --tile-sweep          # also: the torch backend's tile edge
    python benchmarks/gpu_loss.py --dry-run             # tiny sizes on CPU: checks the script runs

For each loss (softmax = CLIP InfoNCE, sigmoid = SigLIP), feature width D (512, 768) and dtype
(fp32, bf16) the global batch B doubles from 8k until every implementation has run out of memory
(``torch.cuda.OutOfMemoryError``, caught per cell), out of time (a cell predicted to take longer
than ``--cell-s``) or B passes ``--max-batch``.  Implementations, single process:

* ``ours-torch`` / ``ours-triton``: ``softmax_contrastive_loss`` / ``sigmoid_contrastive_loss``
  with ``backend="torch"`` (default tile, ``backend.default_tile_size``) or ``"triton"``;
* ``open_clip``: ``open_clip.loss.ClipLoss`` / ``SigLipLoss`` (the B x B logits);
* ``inf_cl``: Inf-CL's ``cal_inf_loss`` (softmax only; both directions, averaged), when installed.

Time: CUDA events around each of ``--repeats`` forward+backward runs after ``--warmup`` runs;
the median, in ms.  Memory: ``torch.cuda.max_memory_allocated()`` during one forward+backward minus
what was allocated before it (the input features and scalars), in MiB: the loss's own peak,
including the feature gradients it returns (2 B D elements, the same for every implementation).
``dloss`` is the relative difference of the loss from open_clip's at the same cell (a check that
every implementation computes the same thing).  One markdown table, ratios vs open_clip (``-``
where open_clip did not run).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip_train.losses import sigmoid_contrastive_loss, softmax_contrastive_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OOM = getattr(torch, "OutOfMemoryError", RuntimeError)


def open_clip_losses():
    """open_clip's loss.py alone (the package import pulls in timm/torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "loss.py")
    mod_spec = importlib.util.spec_from_file_location("_oc_loss", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def inf_cl_loss():
    """Inf-CL's ``cal_inf_loss`` or ``None`` (with the reason printed once)."""
    try:
        from inf_cl import cal_inf_loss
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"note: Inf-CL skipped ({type(exc).__name__}: {exc}); install the inf-cl wheel to include it")
        return None
    return cal_inf_loss


def make_impls(kind, names, ocl, inf_cl):
    """``{name: fn(a, b, s, t) -> loss}`` for the implementations that apply to ``kind``."""
    impls = {}
    for backend in ("torch", "triton"):
        if f"ours-{backend}" in names:
            if kind == "softmax":
                impls[f"ours-{backend}"] = lambda a, b, s, t, be=backend: softmax_contrastive_loss(a, b, s, backend=be)[0]
            else:
                impls[f"ours-{backend}"] = lambda a, b, s, t, be=backend: sigmoid_contrastive_loss(
                    a, b, s, t, backend=be)[0]
    if "open_clip" in names and ocl is not None:
        fn = ocl.ClipLoss() if kind == "softmax" else ocl.SigLipLoss()
        impls["open_clip"] = (lambda a, b, s, t: fn(a, b, s)) if kind == "softmax" else fn
    if "inf_cl" in names and inf_cl is not None and kind == "softmax":
        # Inf-CL's loss is one direction (rows of q against all of k): CLIP averages both.
        impls["inf_cl"] = lambda a, b, s, t: 0.5 * (inf_cl(a, b, scale=s) + inf_cl(b, a, scale=s))
    return impls


def inputs(n, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype).requires_grad_()
    s = torch.tensor(100.0, device=device, requires_grad=True)  # CLIP's logit scale after training
    t = torch.tensor(-10.0, device=device, requires_grad=True)  # SigLIP's initial bias
    return a, b, s, t


def fwd_bwd(fn, leaves):
    for x in leaves:
        x.grad = None
    loss = fn(*leaves)
    loss.backward()
    return loss.detach()


def measure(fn, leaves, warmup, repeats):
    """``(median ms, peak MiB or None, loss)`` of forward+backward."""
    cuda = leaves[0].is_cuda
    for _ in range(warmup):
        fwd_bwd(fn, leaves)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = fwd_bwd(fn, leaves)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = fwd_bwd(fn, leaves)
            times.append(1e3 * (time.perf_counter() - t0))
    peak = None
    if cuda:  # a separate run, so that the grads of the last timed run are not counted as inputs
        for x in leaves:
            x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(fn, leaves)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return statistics.median(times), peak, float(loss)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sweep(kind, d, dtype_name, args, ocl, inf_cl, deadline, rows):
    """Double B for one (kind, D, dtype) until every implementation is out of memory or time."""
    impls = make_impls(kind, args.impls, ocl, inf_cl)
    done, last_ms = {}, {}
    n = args.start
    while n <= args.max_batch and len(done) < len(impls):
        try:
            leaves = inputs(n, d, DTYPES[dtype_name], args.device)
        except OOM:
            break
        cell = {}
        for name, fn in impls.items():
            if name in done:
                continue
            runs = args.warmup + args.repeats + 1
            predicted = last_ms.get(name, 0.0) * 4 * runs / 1e3  # O(B^2) per run
            if predicted > args.cell_s or time.time() + predicted > deadline:
                done[name] = "time"
                continue
            try:
                ms, peak, loss = measure(fn, leaves, args.warmup, args.repeats)
                cell[name] = (ms, peak, loss)
                last_ms[name] = ms
            except OOM:
                done[name] = "OOM"
                cell[name] = None
            free()
        rows.extend(table_rows(kind, d, dtype_name, n, cell))
        del leaves
        free()
        if time.time() > deadline:
            print(f"note: --budget-s reached during {kind} D={d} {dtype_name}; later cells not run")
            return False
        n *= 2
    return True


def table_rows(kind, d, dtype_name, n, cell):
    ref = cell.get("open_clip")
    out = []
    for name, res in cell.items():
        if res is None:
            out.append(f"| {kind} | {d} | {dtype_name} | {n} | {name} | OOM | OOM | | | |")
            continue
        ms, peak, loss = res
        peak_s = "n/a" if peak is None else f"{peak:.0f}"
        if ref is not None:
            t_ratio = f"{ms / ref[0]:.2f}"
            m_ratio = "" if peak is None or not ref[1] else f"{peak / ref[1]:.3f}"
            dloss = f"{abs(loss - ref[2]) / abs(ref[2]):.1e}"
        else:
            t_ratio = m_ratio = dloss = "-"
        out.append(f"| {kind} | {d} | {dtype_name} | {n} | {name} | {ms:.1f} | {peak_s} | {t_ratio} | {m_ratio} | {dloss} |")
    return out


def tile_sweep(args):
    """The torch backend's time and peak memory per tile edge (to replace ``CUDA_TILE_SIZE``)."""
    print(f"\n### torch backend tile edge, B={args.tile_batch}\n")
    print("| loss | D | dtype | tile | ms | peak MiB |\n|---|---|---|---|---|---|")
    for kind in args.kinds:
        for dtype_name in args.dtypes:
            d = max(args.dims)
            leaves = inputs(args.tile_batch, d, DTYPES[dtype_name], args.device)
            for tile in args.tiles:
                if kind == "softmax":
                    fn = lambda a, b, s, t, T=tile: softmax_contrastive_loss(a, b, s, backend="torch", tile_size=T)[0]
                else:
                    fn = lambda a, b, s, t, T=tile: sigmoid_contrastive_loss(a, b, s, t, backend="torch", tile_size=T)[0]
                try:
                    ms, peak, _ = measure(fn, leaves, 1, args.repeats)
                    peak_s = "n/a" if peak is None else f"{peak:.0f}"
                    print(f"| {kind} | {d} | {dtype_name} | {tile} | {ms:.1f} | {peak_s} |")
                except OOM:
                    print(f"| {kind} | {d} | {dtype_name} | {tile} | OOM | OOM |")
                free()
            del leaves
            free()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", default=["softmax", "sigmoid"], choices=["softmax", "sigmoid"])
    p.add_argument("--dims", nargs="+", type=int, default=[512, 768])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--impls", nargs="+", default=["ours-torch", "ours-triton", "open_clip", "inf_cl"],
                   choices=["ours-torch", "ours-triton", "open_clip", "inf_cl"])
    p.add_argument("--start", type=int, default=8192, help="first global batch (doubled each step)")
    p.add_argument("--max-batch", type=int, default=1 << 21, help="largest global batch tried")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cell-s", type=float, default=12.0,
                   help="skip an implementation's next batch when it is predicted to take longer (s)")
    p.add_argument("--budget-s", type=float, default=400.0, help="stop starting new cells after this (s)")
    p.add_argument("--tile-sweep", action="store_true", help="also time the torch backend per tile edge")
    p.add_argument("--tiles", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--tile-batch", type=int, default=32768)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes (B 64..128, D 16), torch backend + open_clip (+ triton under "
                        "TRITON_INTERPRET=1): checks that the script runs")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.dims, args.start, args.max_batch, args.warmup, args.repeats = [16], 64, 128, 0, 1
        args.tiles, args.tile_batch = [32, 64], 64
        keep = ["ours-torch", "open_clip"] + (["ours-triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
        args.impls = [i for i in args.impls if i in keep] + (["inf_cl"] if "inf_cl" in args.impls else [])
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU, or use --dry-run on CPU")
        args.device = "cuda"
    return args


def main(argv=None):
    args = parse(argv)
    ocl = open_clip_losses() if "open_clip" in args.impls else None
    if "open_clip" in args.impls and ocl is None:
        print("note: open_clip not installed: no reference column (pip install open_clip_torch)")
    inf_cl = inf_cl_loss() if "inf_cl" in args.impls and "softmax" in args.kinds else None
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    deadline = time.time() + args.budget_s
    rows = []
    for kind in args.kinds:
        for d in args.dims:
            for dtype_name in args.dtypes:
                if not sweep(kind, d, dtype_name, args, ocl, inf_cl, deadline, rows):
                    break
            else:
                continue
            break
        else:
            continue
        break
    print("\n| loss | D | dtype | B | impl | ms | peak MiB | time / open_clip | mem / open_clip | dloss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.tile_sweep:
        tile_sweep(args)


if __name__ == "__main__":
    main()
