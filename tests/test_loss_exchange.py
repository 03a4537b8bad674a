"""``loss.exchange`` (ring | allgather | auto): the ``auto`` rule, validation, the config and the
objective threading it to every tiled term, and, under a real 3-rank gloo group (odd world,
uneven sizes), ``ring_loop`` itself (mixed dtypes and shapes packed into one buffer, ``sum`` and
``logaddexp`` accumulators) plus NT-Xent and bf16 softmax in both exchanges.

The float64 parity of every term in both exchanges at 1, 2 and 4 ranks lives in
``test_losses_distributed`` and ``test_losses_terms_distributed``.
"""
import dataclasses
import math

import pytest
import torch
from dist_harness import rank_rows, run_workers

from clip_train.config import ConfigError, LossConfig, load_config, to_yaml
from clip_train.losses import naive_nt_xent_loss, nt_xent_loss, softmax_contrastive_loss
from clip_train.losses.objective import TERMS, TermInputs
from clip_train.losses.ring import (
    DEFAULT_EXCHANGE_MEMORY_MB, EXCHANGES, allgather_bytes, make_ring, pass_row_bytes, resolve_exchange, ring_loop,
)
from clip_train.losses.tiled_softmax import exchange_row_bytes

MIB = 2 ** 20


# ----------------------------------------------------------------------------- the auto rule

def test_auto_compares_padded_global_rows_times_row_bytes_with_the_budget():
    sizes, row_bytes = (5, 9, 3), 1000
    need = allgather_bytes(sizes, row_bytes)
    assert need == 3 * 9 * 1000  # every block padded to the largest
    assert resolve_exchange("auto", sizes, row_bytes, need / MIB) == "allgather"  # fits exactly
    assert resolve_exchange("auto", sizes, row_bytes, (need - 1) / MIB) == "ring"
    assert resolve_exchange("auto", sizes, row_bytes, 0) == "ring"
    for fixed in ("ring", "allgather"):  # explicit choices ignore the budget
        assert resolve_exchange(fixed, sizes, 10 ** 12, 0) == fixed


def test_row_bytes_of_the_terms():
    a32, a16 = torch.zeros(2, 512), torch.zeros(2, 512, dtype=torch.bfloat16)
    # Softmax float32: forward 512*4 + 2*8 (column lse, padded to 8 bytes, sent and received);
    # backward 512*4 + 8 (features + column lse gathered) + 2 * 512*4 (gradients sent, received).
    assert exchange_row_bytes(a32) == 2048 + 8 + 2 * 2048
    assert exchange_row_bytes(a16) == 1024 + 8 + 2 * 2048  # bf16 features, float32 gradients
    assert exchange_row_bytes(a32, 0, 0) == 2048 + 2 * 2048  # sigmoid: no statistics
    assert pass_row_bytes([(3, torch.float16)], [(1, torch.float32)]) == 8 + 2 * 8
    # The default budget keeps e.g. a global batch of 32768 x 512 float32 softmax on allgather.
    assert resolve_exchange("auto", (4096,) * 8, exchange_row_bytes(a32)) == "allgather"
    assert resolve_exchange("auto", (4096,) * 64, exchange_row_bytes(a32)) == "ring"


def test_bad_exchange_or_budget_is_refused_by_every_entry_point():
    with pytest.raises(ValueError, match="exchange='ringg': use one of ring, allgather, auto"):
        resolve_exchange("ringg", (1,), 1)
    with pytest.raises(ValueError, match="exchange_memory_mb must be >= 0"):
        make_ring(3, torch.device("cpu"), exchange="auto", memory_mb=-1)
    a, b = torch.randn(2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="use one of ring, allgather, auto"):  # single process too
        softmax_contrastive_loss(a, b, torch.tensor(2.0), exchange="gather")


def test_single_process_is_the_same_local_pass_for_every_exchange():
    a, b = torch.randn(2, 7, 3, dtype=torch.float64)
    out = {ex: softmax_contrastive_loss(a, b, torch.tensor(3.0), tile_size=2, exchange=ex)[0] for ex in EXCHANGES}
    assert out["ring"] == out["allgather"] == out["auto"]


def test_ring_loop_needs_one_known_merge_per_accumulator():
    ring = make_ring(2, torch.device("cpu"))
    with pytest.raises(ValueError, match="one merge op per accumulator"):
        ring_loop(ring, [], [torch.zeros(2)], lambda *_: None)
    with pytest.raises(ValueError, match="one merge op per accumulator"):
        ring_loop(ring, [], [torch.zeros(2)], lambda *_: None, merge=["max"])


# ----------------------------------------------------------------------------- config and objective

def test_config_default_validation_and_documentation():
    cfg = load_config(None, [])
    assert cfg.loss.exchange == "auto" and cfg.loss.exchange_memory_mb == DEFAULT_EXCHANGE_MEMORY_MB
    assert load_config(None, ["loss.exchange=ring", "loss.exchange_memory_mb=16"]).loss.exchange_memory_mb == 16.0
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.exchange=p2p"])
    assert str(err.value) == "loss.exchange='p2p': use ring, allgather or auto"
    with pytest.raises(ConfigError, match="loss.exchange_memory_mb must be >= 0"):
        load_config(None, ["loss.exchange_memory_mb=-1"])
    text = to_yaml(cfg)
    assert "exchange: auto  # " in text and "exchange_memory_mb: 1024.0  # " in text


def all_inputs(n=6, d=4):
    g = torch.Generator().manual_seed(0)
    x = [torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(5)]
    return TermInputs(x[0], x[1], torch.tensor(5.0), torch.tensor(-1.0), image_features_view2=x[2],
                      text_features_view1=x[3], text_features_view2=x[4])


@pytest.mark.parametrize("bad", [dict(exchange="bogus"), dict(exchange_memory_mb=-1.0)])
def test_objective_threads_exchange_and_budget_to_every_tiled_term(bad):
    """A bad value reaches (and is refused by) exactly the terms that exchange blocks."""
    cfg = load_config(None, [])
    inputs, refused = all_inputs(), set()
    for kind in ("softmax", "sigmoid"):
        loss_cfg = dataclasses.replace(LossConfig(kind=kind), **bad)
        for name in sorted(set(TERMS.names()) - {"caption"}):
            try:
                TERMS.get(name).fn(inputs, cfg.objective, loss_cfg)
            except ValueError as err:
                assert "exchange" in str(err)
                refused.add((name, kind))
    tiled = {"contrastive", "intra_image", "intra_text", "embed_dropout", "uniformity", "dcl", "hard_negative"}
    assert refused == {(name, kind) for name in tiled for kind in ("softmax", "sigmoid")}


# ----------------------------------------------------------------------------- 3 gloo ranks

SIZES = [4, 1, 6]  # uneven, odd world


def block(q, dtype_seed=0):
    """Rank q's static tensors: float32 (n, 3), float64 (n,), bf16 (n, 2, 2)."""
    g = torch.Generator().manual_seed(100 + q + dtype_seed)
    n = SIZES[q]
    return [torch.randn(n, 3, generator=g), torch.randn(n, generator=g, dtype=torch.float64),
            torch.randn(n, 2, 2, generator=g).bfloat16()]


def loop_scenario(rank, world, exchange):
    """``ring_loop`` with three static tensors and two accumulators (a float64 sum and a
    float32 log-sum-exp); records what every step saw and the completed accumulators."""
    from clip_train.losses.ring import Ring

    ring = make_ring(SIZES[rank], torch.device("cpu"), exchange=exchange)
    assert isinstance(ring, Ring) and ring.exchange == exchange and ring.sizes == tuple(SIZES)
    n = SIZES[rank]
    seen = {}

    def step(q, blk, acc):
        seen[q] = [t.clone() for t in blk]
        acc[0].add_(blk[0][:, :2].double() * (rank + 1) + blk[1][:, None])
        torch.logaddexp(acc[1], blk[1].float() + rank, out=acc[1])

    acc = ring_loop(ring, block(rank), [torch.zeros(n, 2, dtype=torch.float64), torch.full((n,), -math.inf)],
                    step, merge=["sum", "logaddexp"])
    return {"seen": seen, "acc": acc}


def run_views(v1, v2, exchange, tile=2, grad_out=1.0):
    leaves = [v1.clone().requires_grad_(), v2.clone().requires_grad_()]
    loss, _ = nt_xent_loss(*leaves, temperature=0.3, tile_size=tile, exchange=exchange)
    (loss * grad_out).backward()
    return loss.detach(), [x.grad for x in leaves]


def full_batch(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]


def child(rank, world):
    out = {}
    sl = rank_rows(SIZES, rank)
    v1, v2 = full_batch(sum(SIZES), 5, seed=7)
    a, b = (torch.nn.functional.normalize(x, dim=1) for x in full_batch(sum(SIZES), 8, seed=8))
    for ex in ("ring", "allgather"):
        out[("loop", ex)] = loop_scenario(rank, world, ex)
        out[("nt_xent", ex)] = run_views(v1[sl], v2[sl], ex, grad_out=rank + 1.0)
        # bf16 features with float32 statistics: mixed dtypes in the packed backward buffer.
        leaves = [a[sl].bfloat16().requires_grad_(), b[sl].bfloat16().requires_grad_(),
                  torch.tensor(7.0, requires_grad=True)]
        loss, _ = softmax_contrastive_loss(*leaves, tile_size=3, exchange=ex)
        loss.backward()
        out[("bf16", ex)] = (loss.detach(), [x.grad for x in leaves])
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return run_workers(child, len(SIZES), tmp_path_factory.mktemp("exchange_world3"))


@pytest.mark.parametrize("exchange", ["ring", "allgather"])
def test_ring_loop_visits_every_block_and_merges_accumulators_home(job, exchange):
    W = len(SIZES)
    for rank, res in enumerate(job):
        got = res[("loop", exchange)]
        assert sorted(got["seen"]) == list(range(W))
        for q, blk in got["seen"].items():  # every block arrives bit for bit, dtype and shape kept
            for t, ref in zip(blk, block(q)):
                assert t.dtype == ref.dtype and torch.equal(t, ref)
        x, y, _ = block(rank)
        want_sum = x[:, :2].double() * sum(r + 1 for r in range(W)) + W * y[:, None]
        want_lse = y.float() + math.log(sum(math.exp(r) for r in range(W)))
        torch.testing.assert_close(got["acc"][0], want_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["acc"][1], want_lse)
        assert got["acc"][0].dtype == torch.float64 and got["acc"][1].dtype == torch.float32


def per_rank_nt_xent(v1, v2, tau=0.3):
    """Full-matrix ``L_r = W/(2N) sum_{i in r's rows} (lse_i - S_{i,p(i)})`` (intra_modal's share)."""
    z = torch.nn.functional.normalize(torch.cat([v1, v2]), dim=1)
    n, W = v1.shape[0], len(SIZES)
    S = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    terms = S.logsumexp(1) - S[torch.arange(2 * n), partner]
    terms = terms[:n] + terms[n:]
    return [W / (2.0 * n) * terms[rank_rows(SIZES, r)].sum() for r in range(W)]


def test_nt_xent_both_exchanges_match_naive_with_rank_dependent_grads(job):
    """Backward of sum_r (r + 1) L_r at 3 uneven ranks, both exchanges, float64; the mean of the
    L_r is the naive full-batch loss."""
    v1, v2 = full_batch(sum(SIZES), 5, seed=7)
    leaves = [v1.clone().requires_grad_(), v2.clone().requires_grad_()]
    losses = per_rank_nt_xent(*leaves)
    torch.testing.assert_close(torch.stack(losses).mean(), naive_nt_xent_loss(v1, v2, temperature=0.3)[0])
    sum((r + 1.0) * loss for r, loss in enumerate(losses)).backward()
    for ex in ("ring", "allgather"):
        for rank, res in enumerate(job):
            loss, grads = res[("nt_xent", ex)]
            torch.testing.assert_close(loss, losses[rank].detach(), rtol=1e-10, atol=1e-12)
            for i in range(2):
                torch.testing.assert_close(grads[i], leaves[i].grad[rank_rows(SIZES, rank)], rtol=1e-9, atol=1e-11)
    for res in job:
        torch.testing.assert_close(res[("nt_xent", "allgather")], res[("nt_xent", "ring")], rtol=1e-10, atol=1e-10)


def test_bf16_exchanges_agree(job):
    for res in job:
        (l_ring, g_ring), (l_ag, g_ag) = res[("bf16", "ring")], res[("bf16", "allgather")]
        assert l_ag.dtype == torch.float32 and g_ag[0].dtype == torch.bfloat16
        torch.testing.assert_close(l_ag, l_ring, rtol=1e-5, atol=1e-5)
        for x, y in zip(g_ag, g_ring):  # float32 accumulation order differs; one bf16 ulp at most
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-2, atol=1e-3)
