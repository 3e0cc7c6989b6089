"""Label-free fidelity of a pruned model to its dense parent.

For embeddings: the mean cosine similarity between the dense and the pruned embedding of the same
input, 1/n sum_i <a_i, b_i> / (||a_i|| ||b_i||). A user without labels still learns how much moved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_cosine(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    return float(F.cosine_similarity(dense.float(), pruned.float(), dim=-1).mean())


def fidelity(dense: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{name}_cosine`` for every output the two evaluations share."""
    return {f"{name}_cosine": embedding_cosine(dense[name], pruned[name]) for name in dense if name in pruned}
