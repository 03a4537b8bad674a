"""Captioning check for CoCa models: greedy decoding of captions for a few images.

open_clip's ``CoCa.generate`` needs an older ``transformers`` (its beam-search classes were
removed in transformers 5), so the greedy loop is written here over CoCa's own forward.
"""
from __future__ import annotations

import itertools

import open_clip
import torch

from .datasets import make_loader, open_retrieval_set


@torch.no_grad()
def generate_captions(model, tokenizer, images: torch.Tensor, max_tokens: int = 20) -> list[str]:
    """Greedy decoding: start from <start_of_text>, append the most likely token until <end_of_text>."""
    if not hasattr(model, "text_decoder"):
        raise ValueError("captioning needs a CoCa model (one with a text decoder)")
    image_latent, image_embs = model._encode_image(images)
    tokens = torch.full((images.shape[0], 1), tokenizer.sot_token_id, dtype=torch.long, device=images.device)
    finished = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    for _ in range(max_tokens):
        out = model(images, tokens, image_latent=image_latent, image_embs=image_embs, output_labels=False)
        next_token = out["logits"][:, -1].argmax(dim=-1)
        next_token[finished] = tokenizer.eot_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finished |= next_token == tokenizer.eot_token_id
        if finished.all():
            break
    return [open_clip.decode(row).replace("<start_of_text>", "").split("<end_of_text>")[0].strip() for row in tokens]


def captioning_check(model, preprocess, tokenizer, source, batch_size: int, workers: int, device,
                     num_images: int = 16) -> dict:
    """Captions for the first ``num_images`` images of a retrieval set, with how many match a reference."""
    was_training = model.training
    model.eval()
    samples = []
    try:
        loader = make_loader(open_retrieval_set(source, preprocess), min(batch_size, num_images), workers)
        for images, references in itertools.islice(loader, -(-num_images // min(batch_size, num_images))):
            generated = generate_captions(model, tokenizer, images.to(device))
            samples += [{"generated": g, "references": r} for g, r in zip(generated, references)]
    finally:
        model.train(was_training)
    samples = samples[:num_images]
    exact = sum(s["generated"].lower() in (r.lower() for r in s["references"]) for s in samples)
    return {"captions_generated": len(samples), "exact_match": exact / max(1, len(samples)), "captions": samples}
