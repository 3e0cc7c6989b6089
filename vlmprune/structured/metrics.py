"""Cross-modal metrics on a small set of image-caption pairs, for many candidate models at once.

Inputs are L2-normalised embeddings ``image`` and ``text`` of shape (C, N, d) (C candidates, N pairs;
either may be (N, d) and is then shared) and class labels (N,). Captions of one class are near
duplicates, so matching is class-level (as in :mod:`vlmprune.adapters.clip`):

- ``accuracy``: zero-shot accuracy; class embedding_k = normalise(mean of the captions of class k),
  prediction_i = argmax_k <image_i, class_k>; classes without a caption in the set are not scored;
- ``retrieval``: (image->text R@1 + text->image R@1) / 2, a hit when the top item has the query's class;
- ``loss``: the symmetric multi-positive contrastive loss on ``scale * <image_i, text_j>`` with
  target q_ij = [y_i = y_j] / #{j: y_j = y_i} (CLIP's loss when every class appears once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("accuracy", "retrieval", "loss")


def _batched(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def pair_metrics(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """Each metric as a (C,) tensor."""
    image, text = _batched(image.float()), _batched(text.float())
    c = max(len(image), len(text))
    image, text = image.expand(c, -1, -1), text.expand(c, -1, -1)
    labels = labels.to(image.device)
    classes, index = torch.unique(labels, return_inverse=True)
    onehot = F.one_hot(index, len(classes)).float()                                 # (N, K)
    class_emb = F.normalize(torch.einsum("nk,cnd->ckd", onehot, text), dim=-1)      # (C, K, d)
    predicted = torch.einsum("cnd,ckd->cnk", image, class_emb).argmax(-1)          # (C, N)
    accuracy = (predicted == index).float().mean(1)

    sim = image @ text.transpose(1, 2)                                              # (C, N, N)
    same = (labels[:, None] == labels[None, :]).float()
    i2t = _hits(sim.argmax(2), same)
    t2i = _hits(sim.transpose(1, 2).argmax(2), same)
    target = same / same.sum(1, keepdim=True)
    logits = scale * sim
    loss_i = -(target * F.log_softmax(logits, dim=2)).sum(2).mean(1)
    loss_t = -(target * F.log_softmax(logits.transpose(1, 2), dim=2)).sum(2).mean(1)
    return {"accuracy": accuracy, "retrieval": (i2t + t2i) / 2, "loss": (loss_i + loss_t) / 2}


def _hits(top: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """top: (C, N) index of each query's best item; fraction of queries whose item shares their class."""
    rows = torch.arange(top.shape[1], device=top.device).expand_as(top)
    return same[rows, top].mean(1)


def metric_drop(dense: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor], metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(MoPE, tie-break) per candidate: the drop of ``metric`` (its rise for the loss) when the module is
    removed, and the rise of the loss (to order candidates whose discrete metric drops equally)."""
    loss_rise = pruned["loss"] - dense["loss"]
    if metric == "loss":
        return loss_rise, loss_rise
    return dense[metric] - pruned[metric], loss_rise
