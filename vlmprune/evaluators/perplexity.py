"""Perplexity of a causal language model over fixed token windows.

With windows from :func:`vlmprune.data.text.eval_windows` (window k scores its targets at positions
t >= s_k, s_0 = 1 and s_k = max(1, seq_len - stride) after), every scored token x_t is predicted
from the tokens before it in its window, and

    PPL = exp( (1 / T) * sum_{scored (k, t)} -log p(x_{k,t} | x_{k,<t}) ),

T the number of scored tokens. With stride = seq_len (the default) the windows do not overlap and
each scores seq_len - 1 tokens, the convention of the Wanda and SparseGPT WikiText-2 evaluations.

For label-free fidelity, :func:`perplexity` can also keep the next-token log-probabilities at a
fixed, evenly spread subset of the scored positions (the same positions for every model evaluated
on the same windows), for a KL divergence between a dense and a pruned model
(:func:`vlmprune.evaluators.fidelity.next_token_kl`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Caps that keep evaluation memory bounded whatever the vocabulary: the logits of one forward batch
# (float32 elements) and the log-probabilities kept for fidelity (the baseline stage stores them).
LOGITS_BUDGET = 1 << 27
KEPT_BUDGET = 1 << 23  # 32 MB: e.g. 170 positions of SmolLM2's 49,152-token vocabulary


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    n_tokens: int
    logprobs: torch.Tensor  # (kept positions, vocab) float32 next-token log-probabilities, CPU


def kept_positions(n_scored: int, n_keep: int) -> np.ndarray:
    """Indices (into the scored tokens, in order) of ``n_keep`` evenly spread positions."""
    if n_keep <= 0 or n_scored == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_scored - 1, min(n_keep, n_scored)).round().astype(np.int64))


def keep_budget(vocab_size: int, budget: int = KEPT_BUDGET) -> int:
    """How many next-token distributions of ``vocab_size`` fit in ``budget`` float32 elements."""
    return max(1, budget // max(1, vocab_size))


@torch.no_grad()
def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, score_from: torch.Tensor,
               batch_size: int, device: str = "cpu", vocab_size: int | None = None, keep: int | None = None,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of ``logits_fn`` (token ids (B, L) -> logits (B, L, V)) over ``windows`` (W, L).

    ``batch_size`` windows per forward, lowered so one batch of logits stays under
    :data:`LOGITS_BUDGET` float32 elements when ``vocab_size`` is given. ``keep`` next-token
    distributions are kept (default: as many as fit in :data:`KEPT_BUDGET`).
    """
    n_windows, length = windows.shape
    if vocab_size:
        batch_size = max(1, min(batch_size, LOGITS_BUDGET // (length * vocab_size)))
        keep = keep_budget(vocab_size) if keep is None else keep
    scored_per_window = (length - score_from).clamp(min=0)
    n_scored = int(scored_per_window.sum())
    if n_scored == 0:
        raise ValueError("no token to score: every window is shorter than two tokens")
    targets_kept = set(kept_positions(n_scored, keep or 0).tolist())
    total_nll, seen, kept = 0.0, 0, []
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device)
        logits = logits_fn(ids)[:, :-1].float()
        logprobs = F.log_softmax(logits, dim=-1)
        nll = -logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, L-1): target t = index + 1
        for b in range(ids.shape[0]):
            first = int(score_from[start + b]) - 1  # index into the shifted targets
            total_nll += float(nll[b, first:].double().sum())
            n = length - 1 - first
            wanted = [i - seen for i in range(seen, seen + n) if i in targets_kept]
            if wanted:
                kept.append(logprobs[b, first + torch.tensor(wanted, device=logprobs.device)].cpu())
            seen += n
    mean = total_nll / n_scored
    vocab = logits.shape[-1]
    return PerplexityResult(math.exp(mean), mean, n_scored,
                            torch.cat(kept) if kept else torch.zeros(0, vocab))
