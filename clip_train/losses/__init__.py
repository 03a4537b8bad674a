"""Contrastive losses: tiled (no B x B logits), distributed softmax and sigmoid terms,
decoupled / hard-negative contrastive terms (``decoupled``) and uniformity / alignment
(``geometry``); the distributed terms exchange blocks around a ring or with one all-gather
(``exchange``, see ``ring``).

Each loss is a pure function of the features (+ learnable scale/bias) returning
``(loss, metrics)``; see ``tiled_softmax`` / ``tiled_sigmoid`` for the formulas and the
distributed gradient convention (open_clip ``local_loss=True, gather_with_grad=True``).
"""
from .decoupled import decoupled_contrastive_loss, hard_negative_contrastive_loss
from .geometry import alignment_loss, uniformity_loss, uniformity_terms
from .reference import naive_sigmoid_contrastive_loss, naive_softmax_contrastive_loss
from .reference_terms import (
    naive_alignment_loss, naive_decoupled_contrastive_loss, naive_hard_negative_contrastive_loss,
    naive_uniformity_loss,
)
from .tiled_sigmoid import sigmoid_contrastive_loss
from .tiled_softmax import softmax_contrastive_loss
from .intra_modal import embed_dropout_loss, embedding_dropout_views, nt_xent_loss
from .caption import caption_loss
from .reference_intra import naive_caption_loss, naive_nt_xent_loss

__all__ = [
    "softmax_contrastive_loss",
    "sigmoid_contrastive_loss",
    "naive_softmax_contrastive_loss",
    "naive_sigmoid_contrastive_loss",
    "decoupled_contrastive_loss",
    "hard_negative_contrastive_loss",
    "uniformity_loss",
    "uniformity_terms",
    "alignment_loss",
    "naive_decoupled_contrastive_loss",
    "naive_hard_negative_contrastive_loss",
    "naive_uniformity_loss",
    "naive_alignment_loss",
    "nt_xent_loss",
    "embedding_dropout_views",
    "embed_dropout_loss",
    "caption_loss",
    "naive_nt_xent_loss",
    "naive_caption_loss",
]
