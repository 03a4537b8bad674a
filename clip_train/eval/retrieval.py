"""Zero-shot image-text retrieval of an in-memory open_clip-style model."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from clip_train.eval import metrics
from clip_train.eval.datasets import batches
from clip_train.eval.loading import EvalError
from clip_train.eval.zeroshot import autocast_context, encode_signal


@torch.no_grad()
def embed_batches(model, tokenizer, dataloader: Iterable, device, amp=False, signal_dtype=None):
    """Normalised image embeddings (I, D) or None when the loader yields nothing, caption
    embeddings (T, D) or None when there are no captions, and per caption the position of its
    image in the loader's order (T,). The loader yields (images, list of caption lists)."""
    image_chunks, text_chunks, text_to_image = [], [], []
    images_seen = 0
    for images, caption_lists in batches(dataloader):
        captions = [caption for captions in caption_lists for caption in captions]
        text_to_image += [images_seen + i for i, captions in enumerate(caption_lists) for _ in captions]
        images_seen += len(caption_lists)
        with autocast_context(device, amp):
            image_chunks.append(F.normalize(encode_signal(model, images, device, signal_dtype), dim=-1).cpu())
            if captions:
                tokens = tokenizer(captions).to(device)  # token ids stay integers whatever signal_dtype is
                text_chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    images = torch.cat(image_chunks) if image_chunks else None
    texts = torch.cat(text_chunks) if text_chunks else None
    return images, texts, torch.tensor(text_to_image, dtype=torch.long)


def check_embedded(images, texts) -> None:
    if images is None:
        raise EvalError("the retrieval dataset yielded no samples")
    if texts is None:
        raise EvalError("the retrieval dataset has no captions")


def embed_images_and_captions(model, tokenizer, dataloader: Iterable, device, amp=False, signal_dtype=None):
    """Normalised image embeddings (I, D), caption embeddings (T, D) and, per caption, the index
    of its image (T,). The loader yields (images, list of caption lists)."""
    images, texts, text_to_image = embed_batches(model, tokenizer, dataloader, device, amp=amp,
                                                 signal_dtype=signal_dtype)
    check_embedded(images, texts)
    return images, texts, text_to_image


def zeroshot_retrieval(model, tokenizer, dataloader, device, recall_k_list: Sequence[int] = (1, 5, 10), amp=False,
                       signal_dtype=None) -> dict:
    """`image_retrieval_recall@k` and `text_retrieval_recall@k` for every k of `recall_k_list`."""
    images, texts, text_to_image = embed_images_and_captions(model, tokenizer, dataloader, device, amp=amp,
                                                             signal_dtype=signal_dtype)
    return metrics.retrieval_metrics(images, texts, text_to_image, recall_k_list)
