"""Zero-shot image-text retrieval of an in-memory open_clip-style model."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from clip_train.eval import metrics
from clip_train.eval.loading import EvalError
from clip_train.eval.zeroshot import autocast_context


@torch.no_grad()
def embed_images_and_captions(model, tokenizer, dataloader: Iterable, device, amp=False):
    """Normalised image embeddings (I, D), caption embeddings (T, D) and, per caption, the index
    of its image (T,). The loader yields (images, list of caption lists)."""
    image_chunks, text_chunks, text_to_image = [], [], []
    images_seen = 0
    for images, caption_lists in dataloader:
        captions = [caption for captions in caption_lists for caption in captions]
        text_to_image += [images_seen + i for i, captions in enumerate(caption_lists) for _ in captions]
        images_seen += len(caption_lists)
        with autocast_context(device, amp):
            image_chunks.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
            if captions:
                tokens = tokenizer(captions).to(device)
                text_chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    if not image_chunks:
        raise EvalError("the retrieval dataset yielded no samples")
    if not text_chunks:
        raise EvalError("the retrieval dataset has no captions")
    return torch.cat(image_chunks), torch.cat(text_chunks), torch.tensor(text_to_image)


def zeroshot_retrieval(model, tokenizer, dataloader, device, recall_k_list: Sequence[int] = (1, 5, 10), amp=False) -> dict:
    """`image_retrieval_recall@k` and `text_retrieval_recall@k` for every k of `recall_k_list`."""
    images, texts, text_to_image = embed_images_and_captions(model, tokenizer, dataloader, device, amp=amp)
    return metrics.retrieval_metrics(images, texts, text_to_image, recall_k_list)
