"""Train the projection heads of the dual encoder with both towers locked (LiT-style tuning).

Loss: CLIP's symmetric contrastive loss with multi-positive targets (several images in a batch
share a class, so they share a caption class): for a batch of n image/caption pairs with labels y,
logits_ij = exp(t) <f_i, g_j>, target P_ij = 1[y_i = y_j] / #{k: y_k = y_i}, and
loss = (CE(logits, P) + CE(logits^T, P)) / 2 with soft cross-entropy CE(l, P) = -mean_i sum_j P_ij log softmax(l_i)_j.

The towers are frozen, so their features are computed once and cached; only the heads and the
temperature are optimised (seconds on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmprune.data.images import ImageDataset, to_pixel_values
from vlmprune.models.dual_encoder import DualEncoder


@dataclass
class HeadTrainingResult:
    final_loss: float
    epochs: int


def multi_positive_contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Symmetric soft-target contrastive loss; see the module docstring."""
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


@torch.no_grad()
def _tower_features(model: DualEncoder, tokenizer, data: ImageDataset, batch_size: int):
    image_feats = []
    for start in tqdm(range(0, len(data), batch_size), desc="image features", leave=False):
        pixels = to_pixel_values(data.images[start:start + batch_size], model.config.image_size)
        image_feats.append(model.image_features(pixels))
    captions = [t.format(c) for c in data.class_names for t in data.train_templates]
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    text_feats = model.text_features(batch["input_ids"], batch["attention_mask"])
    return torch.cat(image_feats), text_feats.view(len(data.class_names), len(data.train_templates), -1)


def train_heads(model: DualEncoder, tokenizer, data: ImageDataset, epochs: int = 30, batch_size: int = 128,
                lr: float = 1e-3, seed: int = 0) -> HeadTrainingResult:
    """Fit ``image_projection``, ``text_projection`` and ``logit_scale`` on ``data``; towers untouched.

    The heads are re-initialised from ``seed`` first, so the result depends only on the towers,
    the data and the seed.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.image_projection.reset_parameters()
    model.text_projection.reset_parameters()
    with torch.no_grad():
        model.logit_scale.fill_(2.6592)  # log(1 / 0.07), CLIP's initial temperature
    model.eval()
    image_feats, text_feats = _tower_features(model, tokenizer, data, batch_size=64)
    labels = torch.from_numpy(data.labels)
    n_templates = text_feats.shape[1]
    params = [model.image_projection.weight, model.text_projection.weight, model.logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(epochs), desc="train heads", leave=False):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            y = labels[idx]
            template = torch.randint(n_templates, (len(idx),), generator=generator)
            img = F.normalize(model.image_projection(image_feats[idx]), dim=-1)
            txt = F.normalize(model.text_projection(text_feats[y, template]), dim=-1)
            logits = model.logit_scale.clamp(max=4.6052).exp() * img @ txt.T
            loss = multi_positive_contrastive_loss(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return HeadTrainingResult(final_loss=loss.item(), epochs=epochs)
