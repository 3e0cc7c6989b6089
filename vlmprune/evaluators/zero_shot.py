"""Zero-shot classification for CLIP-style dual encoders (Radford et al. 2021).

Each class is represented by the mean of the L2-normalised text embeddings of its prompts
(prompt ensembling), re-normalised; an image is assigned the class of highest cosine similarity.
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
