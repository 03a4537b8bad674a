"""Shared fixtures."""
import pytest
import torch

from data_prep.cli import main as prep_main


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): on shared
    CPUs intra-op threads cost far more than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """``clip-prep demo`` output, built once per session; tests only read it (runs go to their own dirs)."""
    out = tmp_path_factory.mktemp("demo_dataset") / "demo"
    assert prep_main(["demo", "--out", str(out)]) == 0
    return out


@pytest.fixture
def reference_accuracy(monkeypatch):
    """CLIP_benchmark's zero-shot classification module, with its numpy-2 bug patched.

    clip-benchmark 1.6.2's ``accuracy`` calls float() on a one-element array (an error under numpy 2);
    this is the same formula with ``.item()``. Our harness does not inherit the bug.
    """
    from clip_benchmark.metrics import zeroshot_classification as reference

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target) for k in topk]

    monkeypatch.setattr(reference, "accuracy", accuracy)
    return reference
