"""The fused Triton backend of the softmax / sigmoid losses, run by Triton's CPU interpreter.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is first imported, which
this pytest process may already have done (DeepSpeed imports it), so one fresh process
(``triton_interpret_worker.py``) runs every ``backend="triton"`` case and saves the results; the
tests here compute the references (torch backend, open_clip's ``ClipLoss`` / ``SigLipLoss``) and
compare.  The interpreter is slow, so the shapes are tiny; with 16-wide blocks on CPU
(``backend.triton_blocks``) they still have ragged row, column and feature edges, several
feature chunks and several column groups.

Parity: float64 loss, metrics and gradients (features, scale, bias) equal to the torch backend
and to open_clip; float32 to the torch backend; bf16 inputs (float32 statistics) to the float32
reference; two gloo ranks (ring and all-gather exchanges) to the single-process loss.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_harness import rank_rows
from loss_helpers import open_clip_loss_module
from triton_interpret_worker import CASES, DIST_D, DIST_SIZES, SCALARS, make_inputs, run

from clip_train.losses.backend import resolve_backend, triton_blocks

pytest.importorskip("triton")

OCL = open_clip_loss_module()
WORKER = Path(__file__).with_name("triton_interpret_worker.py")
TOL64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """Everything the worker computed with ``backend="triton"`` under the interpreter."""
    out = tmp_path_factory.mktemp("triton") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"triton worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=False)


def assert_close_all(xs, ys, **tol):
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        torch.testing.assert_close(x, y, msg=lambda m: f"output {i}: {m}", **tol)


@pytest.mark.parametrize("n,d", CASES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_float64_equals_torch_backend_and_open_clip(fused, kind, n, d):
    got, got_metrics = fused[("float64", kind, n, d)]
    inputs = make_inputs(n, d)
    ref, ref_metrics = run(kind, inputs, backend="torch", tile_size=8)
    oc, _ = run(kind, inputs, open_clip=OCL)
    assert_close_all(got, ref, **TOL64)
    assert_close_all(got, oc, **TOL64)
    for key in ("loss", "pos_logit_mean", "neg_logit_mean"):
        torch.testing.assert_close(got_metrics[key], ref_metrics[key], **TOL64)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_float32_and_grad_output(fused, kind):
    got, _ = fused[("float32", kind)]
    ref, _ = run(kind, make_inputs(37, 40, torch.float32), grad_out=-2.5, backend="torch", tile_size=8)
    assert [x.dtype for x in got[:3]] == [torch.float32] * 3
    assert_close_all(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bf16_inputs_float32_statistics(fused, kind):
    got, metrics = fused[("bf16", kind)]
    inputs = make_inputs(37, 40, torch.bfloat16)
    # Reference: the same (bf16-rounded) features in float32.
    ref, _ = run(kind, [x.float() for x in inputs[:2]] + inputs[2:], backend="torch", tile_size=8)
    assert got[0].dtype == torch.float32 and metrics["loss"].dtype == torch.float32
    assert [g.dtype for g in got[1:3]] == [torch.bfloat16] * 2
    # S and the statistics are float32 from exact bf16 products: the loss is float32-close.
    torch.testing.assert_close(got[0].double(), ref[0].double(), rtol=1e-5, atol=1e-5)
    # Gradients: G is rounded to bf16 for the tensor-core product, as in the torch path.
    for g, r in zip(got[1:], ref[1:]):
        err = (g.double() - r.double()).abs().max() / r.double().abs().max()
        assert err < 1e-2, err


def test_two_gloo_ranks_match_single_process(fused):
    """open_clip's convention: the mean over ranks of the loss and of the scalar gradients is the
    full-batch value; each rank's feature gradient is W x the full-batch one of its rows."""
    inputs = make_inputs(sum(DIST_SIZES), DIST_D, seed=3)
    for kind in ("softmax", "sigmoid"):
        ref, _ = run(kind, inputs, backend="torch")
        for ex in ("ring", "allgather"):
            per_rank = [res[(kind, ex)] for res in fused["gloo"]]
            for i in [0, *range(3, 3 + SCALARS[kind])]:  # loss, scale[, bias]
                torch.testing.assert_close(torch.stack([r[i] for r in per_rank]).mean(0), ref[i], **TOL64)
            for rank, r in enumerate(per_rank):
                for i in (1, 2):
                    torch.testing.assert_close(r[i], 2 * ref[i][rank_rows(DIST_SIZES, rank)], **TOL64)


def test_blocks_on_cpu_are_small_powers_of_two():
    blk = triton_blocks(torch.device("cpu"), 40, torch.float32)
    assert (blk.m, blk.n, blk.d, blk.do) == (16, 16, 16, 16)


def test_auto_is_torch_on_cpu(monkeypatch):
    x = torch.zeros(2, 3)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("torch", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", x) == "torch"  # auto never picks the interpreter
    assert resolve_backend("triton", x) == "triton"


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_triton_on_cpu_without_interpreter_fails_in_one_line(kind, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(4, 8)
    one_line_error(lambda: run(kind, inputs, backend="triton"), "backend='triton' needs CUDA tensors, got cpu")


def test_missing_triton_and_bad_name_fail_in_one_line(monkeypatch):
    inputs = make_inputs(4, 8)
    one_line_error(lambda: run("softmax", inputs, backend="cuda"), "use one of auto, torch, triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    one_line_error(lambda: run("softmax", inputs, backend="triton"), "pip install triton")
    assert resolve_backend("auto", inputs[0]) == "torch"


def test_loss_backend_is_a_config_key_checked_at_load_time():
    from clip_train.config import ConfigError, load_config

    assert load_config(None, []).loss.backend == "auto"
    assert load_config(None, ["loss.backend=torch"]).loss.backend == "torch"
    with pytest.raises(ConfigError, match="loss.backend='cuda': use auto, torch or triton"):
        load_config(None, ["loss.backend=cuda"])
