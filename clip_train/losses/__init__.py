"""Contrastive losses: tiled (no B x B logits), ring-distributed softmax and sigmoid terms.

Each loss is a pure function of the features (+ learnable scale/bias) returning
``(loss, metrics)``; see ``tiled_softmax`` / ``tiled_sigmoid`` for the formulas and the
distributed gradient convention (open_clip ``local_loss=True, gather_with_grad=True``).
"""
from .reference import naive_sigmoid_contrastive_loss, naive_softmax_contrastive_loss
from .tiled_sigmoid import sigmoid_contrastive_loss
from .tiled_softmax import softmax_contrastive_loss

__all__ = [
    "softmax_contrastive_loss",
    "sigmoid_contrastive_loss",
    "naive_softmax_contrastive_loss",
    "naive_sigmoid_contrastive_loss",
]
