"""Zero-shot classification and class-aware retrieval for CLIP-style dual encoders (Radford et al. 2021).

Each class is represented by the mean of the L2-normalised text embeddings of its prompts
(prompt ensembling), re-normalised; an image is assigned the class of highest cosine similarity.
Retrieval between held-out images and one caption each: an item counts as correct when it belongs to
the query's class (labelled sets have many images per class), R@k = fraction of queries with a
correct item among their k most similar items, in both directions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmprune.data.images import to_pixel_values


@torch.no_grad()
def embed_images(encode_image: Callable, images: np.ndarray, image_size: int, batch_size: int = 64,
                 device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """L2-normalised image embeddings, (n, d), computed in batches of raw uint8 images."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="images", disable=not progress, leave=False):
        pixels = to_pixel_values(images[start:start + batch_size], image_size).to(device)
        out.append(F.normalize(encode_image(pixels).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(encode_text: Callable, tokenizer, texts: list[str], batch_size: int = 256,
                device: str = "cpu") -> torch.Tensor:
    """L2-normalised text embeddings, (n, d)."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt").to(device)
        out.append(F.normalize(encode_text(batch["input_ids"], batch["attention_mask"]).float(), dim=-1).cpu())
    return torch.cat(out)


def class_embeddings(encode_text: Callable, tokenizer, class_names: list[str], templates: list[str],
                     device: str = "cpu") -> torch.Tensor:
    """One normalised embedding per class: the normalised mean over its prompt templates, (classes, d)."""
    texts = [t.format(name) for name in class_names for t in templates]
    emb = embed_texts(encode_text, tokenizer, texts, device=device)
    emb = emb.view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def zero_shot_accuracy(image_embeddings: torch.Tensor, class_emb: torch.Tensor, labels: np.ndarray) -> float:
    """Fraction of images whose most similar class embedding is their label."""
    predictions = (image_embeddings @ class_emb.T).argmax(dim=1).numpy()
    return float((predictions == labels).mean())


def recall_at_k(similarity: torch.Tensor, query_labels: np.ndarray, item_labels: np.ndarray, k: int) -> float:
    """Fraction of queries (rows) with an item of their own label among their ``k`` most similar items."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices.numpy()
    hits = (item_labels[top] == query_labels[:, None]).any(axis=1)
    return float(hits.mean())


def retrieval_recalls(images: torch.Tensor, captions: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """i2t_r1/i2t_r5 (image -> captions) and t2i_r1/t2i_r5 (caption -> images); row i of both is example i."""
    similarity = images @ captions.T
    return {
        "i2t_r1": recall_at_k(similarity, labels, labels, 1),
        "i2t_r5": recall_at_k(similarity, labels, labels, 5),
        "t2i_r1": recall_at_k(similarity.T, labels, labels, 1),
        "t2i_r5": recall_at_k(similarity.T, labels, labels, 5),
    }


def eval_captions(class_names: list[str], templates: list[str], labels: np.ndarray, seed: int) -> list[str]:
    """One caption per example: its class name in an evaluation template drawn with ``seed``."""
    choice = np.random.default_rng(seed).integers(len(templates), size=len(labels))
    return [templates[t].format(class_names[y]) for t, y in zip(choice, labels)]
