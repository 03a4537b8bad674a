"""Helpers shared by the loss tests (imported by them as ``loss_helpers``)."""
import importlib.util
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def open_clip_loss_module():
    """open_clip's ``loss.py`` loaded on its own: importing the ``open_clip`` package pulls
    in timm/torchvision (~8 s per process); ``loss.py`` itself only needs torch."""
    pkg_dir = os.path.dirname(importlib.util.find_spec("open_clip").origin)
    spec = importlib.util.spec_from_file_location("_open_clip_loss", os.path.join(pkg_dir, "loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OpRecorder(TorchDispatchMode):
    """Records the largest tensor produced by any aten op and the dtypes produced per op."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.dtypes = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
                self.dtypes.setdefault(func.__name__.split(".")[0], set()).add(t.dtype)
        return out
