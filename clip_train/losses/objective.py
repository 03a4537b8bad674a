"""The training objective: named loss terms, each a pure function returning ``(loss, metrics)``,
registered here and combined with the weights of ``objective.terms``.

Every term reads what it needs from one ``TermInputs`` bundle and declares which optional inputs
those are (second image view, caption views, caption logits), so the loader and the trainer only
produce them when a term asks for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ConfigError
from ..registry import Registry
from .caption import caption_loss
from .decoupled import decoupled_contrastive_loss, hard_negative_contrastive_loss
from .geometry import alignment_loss, uniformity_terms
from .intra_modal import embed_dropout_loss, nt_xent_loss
from .tiled_sigmoid import sigmoid_contrastive_loss
from .tiled_softmax import softmax_contrastive_loss

IMAGE_VIEW2 = "image_view2"
TEXT_VIEWS = "text_views"
CAPTION = "caption"


@dataclass
class TermInputs:
    """Model outputs for one batch (this rank's rows); optional fields are None unless a term needs them."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor  # 0-dim multiplier (already exponentiated)
    logit_bias: torch.Tensor | None = None
    image_features_view2: torch.Tensor | None = None
    text_features_view1: torch.Tensor | None = None
    text_features_view2: torch.Tensor | None = None
    caption_logits: torch.Tensor | None = None
    caption_labels: torch.Tensor | None = None


@dataclass
class Term:
    fn: Callable  # fn(inputs, cfg, loss_cfg) -> (loss, metrics)
    needs: frozenset = field(default_factory=frozenset)


TERMS: Registry[Term] = Registry("objective term")


def register(name: str, *needs: str):
    def decorator(fn):
        TERMS.register(name)(Term(fn, frozenset(needs)))
        return fn
    return decorator


def _tiled(loss_cfg) -> dict:
    """Keywords of every tiled, distributed term: tile edge and block exchange (``loss.*``)."""
    return dict(tile_size=loss_cfg.tile_size, exchange=loss_cfg.exchange,
                exchange_memory_mb=loss_cfg.exchange_memory_mb)


@register("contrastive")
def _contrastive(x: TermInputs, cfg, loss_cfg):
    # loss.backend (auto | torch | triton, see losses/backend.py): only these two terms have fused kernels.
    kw = dict(_tiled(loss_cfg), backend=loss_cfg.backend)
    if loss_cfg.kind == "sigmoid":
        return sigmoid_contrastive_loss(x.image_features, x.text_features, x.logit_scale, x.logit_bias, **kw)
    return softmax_contrastive_loss(x.image_features, x.text_features, x.logit_scale, **kw)


@register("caption", CAPTION)
def _caption(x: TermInputs, cfg, loss_cfg):
    return caption_loss(x.caption_logits, x.caption_labels)


@register("intra_image", IMAGE_VIEW2)
def _intra_image(x: TermInputs, cfg, loss_cfg):
    return nt_xent_loss(x.image_features, x.image_features_view2, temperature=cfg.intra_temperature,
                        **_tiled(loss_cfg))


@register("intra_text", TEXT_VIEWS)
def _intra_text(x: TermInputs, cfg, loss_cfg):
    return nt_xent_loss(x.text_features_view1, x.text_features_view2, temperature=cfg.intra_temperature,
                        **_tiled(loss_cfg))


@register("embed_dropout")
def _embed_dropout(x: TermInputs, cfg, loss_cfg):
    # The non-text tower's embedding, as MERL does for ECG; works for any modality.
    return embed_dropout_loss(x.image_features, p=cfg.embed_dropout_p, temperature=cfg.intra_temperature,
                              **_tiled(loss_cfg))


@register("uniformity")
def _uniformity(x: TermInputs, cfg, loss_cfg):
    return uniformity_terms(x.image_features, x.text_features, t=cfg.uniformity_t, **_tiled(loss_cfg))


@register("alignment")
def _alignment(x: TermInputs, cfg, loss_cfg):
    return alignment_loss(x.image_features, x.text_features, alpha=cfg.alignment_alpha)


@register("dcl")
def _dcl(x: TermInputs, cfg, loss_cfg):
    return decoupled_contrastive_loss(x.image_features, x.text_features, x.logit_scale, **_tiled(loss_cfg))


@register("hard_negative")
def _hard_negative(x: TermInputs, cfg, loss_cfg):
    beta = cfg.hard_negative_beta
    return hard_negative_contrastive_loss(x.image_features, x.text_features, x.logit_scale, beta_image=beta,
                                          beta_text=beta, alpha=cfg.hard_negative_alpha, **_tiled(loss_cfg))


def check_term_names(terms: dict[str, float]) -> None:
    unknown = [name for name in terms if name not in TERMS]
    if unknown:
        raise ConfigError(f"objective.terms: unknown term {unknown[0]!r}; valid terms: {', '.join(TERMS.names())}")


class Objective:
    """``Σ_name weight · term(inputs)``; metrics carry each term's loss under its own name."""

    def __init__(self, objective_cfg, loss_cfg):
        check_term_names(objective_cfg.terms)
        self.weights = {name: w for name, w in objective_cfg.terms.items() if w > 0}
        self.cfg, self.loss_cfg = objective_cfg, loss_cfg

    @property
    def needs(self) -> set[str]:
        """The optional inputs (second views, captions) that the active terms read."""
        return set().union(*(TERMS.get(name).needs for name in self.weights))

    def __call__(self, inputs: TermInputs) -> tuple[torch.Tensor, dict]:
        total, metrics = None, {}
        for name, weight in self.weights.items():
            loss, term_metrics = TERMS.get(name).fn(inputs, self.cfg, self.loss_cfg)
            total = weight * loss if total is None else total + weight * loss
            # Detached tensors, not floats: the trainer reads them on the host only on logging steps.
            metrics[name] = _detached(term_metrics.get("loss", loss))
            metrics.update({f"{name}/{k}": _detached(v) for k, v in term_metrics.items() if k != "loss"})
        return total, metrics


def _detached(value) -> torch.Tensor:
    return value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
