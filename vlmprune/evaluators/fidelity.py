"""Label-free fidelity of a pruned model to its dense parent.

For embeddings: the mean cosine similarity between the dense and the pruned embedding of the same
input, 1/n sum_i <a_i, b_i> / (||a_i|| ||b_i||). A user without labels still learns how much moved.
For next-token distributions of language models (outputs named ``*logits``): the mean KL divergence
KL(dense || pruned) and the top-1 agreement over the same token positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_cosine(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    return float(F.cosine_similarity(dense.float(), pruned.float(), dim=-1).mean())


# Next-token distributions (language-model outputs). An output whose name ends in ``logits`` holds
# (positions, vocab) logits or log-probabilities of the same positions for both models.

def next_token_kl(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """Mean KL(dense || pruned) of next-token distributions, in nats:
    1/n sum_i sum_v p_i(v) (log p_i(v) - log q_i(v)), p = softmax(dense_i), q = softmax(pruned_i)."""
    if dense.numel() == 0:
        return 0.0
    log_p = F.log_softmax(dense.float(), dim=-1)
    log_q = F.log_softmax(pruned.float(), dim=-1)
    return float(F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean())


def top1_agreement(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """Fraction of positions where both models rank the same next token first."""
    if dense.numel() == 0:
        return 1.0
    return float((dense.argmax(-1) == pruned.argmax(-1)).float().mean())


def distribution_fidelity(dense: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{prefix}kl`` and ``{prefix}top1_agreement`` for every shared output named ``{prefix}logits``."""
    out = {}
    for name in dense:
        if name.endswith("logits") and name in pruned:
            prefix = name[: -len("logits")]
            out[f"{prefix}kl"] = next_token_kl(dense[name], pruned[name])
            out[f"{prefix}top1_agreement"] = top1_agreement(dense[name], pruned[name])
    return out


def fidelity(dense: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{name}_cosine`` for every shared embedding output; KL divergence and top-1 agreement of the
    next-token distributions for every shared output whose name ends in ``logits``."""
    cosines = {f"{name}_cosine": embedding_cosine(dense[name], pruned[name])
               for name in dense if name in pruned and not name.endswith("logits")}
    return {**cosines, **distribution_fidelity(dense, pruned)}
