"""Self-supervised training of the meta-router: no labels, only the dense model's own outputs.

Data: unlabelled images with the VQA prompt; the dense model's greedy answer ``y`` (up to EOS) is
appended, and the positions ``P_x`` that predict the answer tokens are scored.

Loss (one operating point ``(r_t, r_l)`` drawn uniformly per step from the grid minus the dense
point, so one router learns every operating point):

    L(theta) = E_{(r_t, r_l)} E_x (1 / |P_x|) sum_{i in P_x} KL( p_dense(. | x_<=i) || p_theta^{r_t, r_l}(. | x_<=i) )

where ``p_theta`` is the model with the router's choices (PAR, seed paper 003: "self-supervised",
matching the dense outputs). Choices are hard top-k in the forward pass, so the trained model is
exactly the pruned model; gradients reach the scores by straight-through estimators:

- tokens: ``m_j = 1[j in top_k(s)] + sigmoid(s_j) - stopgrad(sigmoid(s_j))`` weights key ``j`` in every
  attention row of layers ``k ..``: ``A'_ij = A_ij m_j / sum_j' A_ij' m_j'`` (text tokens: m = 1);
- layers: ``g_l = 1[l in top_k(z)] + sigmoid(z_l) - stopgrad(sigmoid(z_l))`` gates the residual update,
  ``h_{l+1} = h_l + g_l (f_l(h_l) - h_l)``.

With ``token_loss="contributions"`` the token head is trained instead to rank the visual tokens
like their measured contributions (:mod:`vlmprune.par.contributions`: ``n_subsets`` keep-sets per
training input, random or around the spread prior's keep-set (``token_sets``), a ridge fit of their
KL), by the ListNet loss (Cao et al., ICML 2007)
``- sum_j softmax(z)_j log softmax(s)_j`` with ``z`` the per-input standardised contributions; the
straight-through masks then carry no gradient to the token head (its hard top-k still decides the
tokens while the layer head trains). Which is better depends on the model
(``benchmarks/results/router_training*.md``): on the offline LLaVA-style model with 16 visual tokens
straight-through keeps more accuracy at 50% tokens (0.42 vs 0.33 of a dense 0.75), with 64 visual
tokens straight-through training diverges (held-out KL 0.60 nats, worse than random keep-sets' 0.10)
while the ranked head reaches 0.025.

The language model is frozen; ``h_k`` and the dense targets are computed once and cached.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vlmprune.par.decoder import Decoder
from vlmprune.par.engine import Plan, check_batch, generate, keep_count, rotary, run_layer_weighted, run_prefix
from vlmprune.par.policies import top_mask
from vlmprune.par.router import MetaRouter


@dataclass
class Examples:
    """Cached training inputs: ``hidden`` = h_k (N, S, H) of prompt + dense answer, ``visual_mask``
    (N, S), ``prompt_len`` T, ``targets`` = dense log-probabilities (N, A, V) at positions
    ``T-1 .. T+A-2``, ``valid`` (N, A) marks answer tokens up to and including EOS."""

    hidden: torch.Tensor
    visual_mask: torch.Tensor
    prompt_len: int
    targets: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def batch(self, index) -> "Examples":
        return Examples(self.hidden[index], self.visual_mask[index], self.prompt_len, self.targets[index],
                        self.valid[index])


@contextmanager
def frozen(dec: Decoder):
    """The language model's parameters without gradients for the duration."""
    params = [p for m in (dec.layers, dec.norm, dec.lm_head, dec.embed_tokens) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@torch.no_grad()
def make_examples(dec: Decoder, input_ids: torch.Tensor, pixel_values: torch.Tensor, k: int,
                  max_new_tokens: int, batch_size: int = 16, progress: bool = False) -> Examples:
    """Dense greedy answers for ``pixel_values`` (N, ...) under the prompt ``input_ids`` (1, T), and
    the cached h_k and dense targets (:class:`Examples`)."""
    eos = dec.eos_token_id
    eos = set() if eos is None else set(eos) if isinstance(eos, (list, tuple)) else {eos}
    T = input_ids.shape[1]
    parts = {"hidden": [], "visual_mask": [], "targets": [], "valid": []}
    starts = range(0, pixel_values.shape[0], batch_size)
    for start in tqdm(starts, desc="router data", disable=not progress):
        pixels = pixel_values[start:start + batch_size]
        ids = input_ids.expand(pixels.shape[0], -1)
        answer = generate(dec, ids, pixels, Plan(1.0, 1.0, k), max_new_tokens=max_new_tokens)
        valid = torch.ones_like(answer, dtype=torch.bool)
        for i, row in enumerate(answer.tolist()):
            ends = [j for j, t in enumerate(row) if t in eos]
            if ends:
                valid[i, ends[0] + 1:] = False
        full = torch.cat([ids, answer], dim=1)
        embeds = dec.embed_inputs(full, pixels)
        mask = dec.visual_mask(full)
        prefix = run_prefix(dec, embeds, mask, k)
        h = prefix.hidden
        positions = torch.arange(full.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
        cos, sin = rotary(dec, h, positions)
        ones = torch.ones(mask.shape, dtype=h.dtype, device=h.device)
        out = h
        for index in range(k, dec.n_layers):
            out = run_layer_weighted(dec, dec.layers[index], out, cos, sin, ones)
        logits = dec.lm_head(dec.norm(out[:, T - 1:T - 1 + answer.shape[1]]))
        parts["hidden"].append(h)
        parts["visual_mask"].append(mask)
        parts["targets"].append(torch.log_softmax(logits.float(), dim=-1))
        parts["valid"].append(valid)
    return Examples(torch.cat(parts["hidden"]), torch.cat(parts["visual_mask"]), T, torch.cat(parts["targets"]),
                    torch.cat(parts["valid"]))


def straight_through(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``1[top_k] + sigmoid(s) - stopgrad(sigmoid(s))``: hard in value, sigmoid's gradient."""
    soft = torch.sigmoid(scores)
    return top_mask(scores.detach(), n_keep).to(soft.dtype) + soft - soft.detach()


def answer_kl(dec: Decoder, batch: Examples, k: int, key_weight: torch.Tensor,
              gates: torch.Tensor | None = None) -> torch.Tensor:
    """KL(dense || pruned) (B, A) at each answer position (zero after EOS): layers ``k ..`` run on the
    cached h_k with visual keys weighted by ``key_weight`` (B, S) and, when given, layer ``l``'s
    residual update scaled by ``gates[:, l - k]``."""
    T, L, h = batch.prompt_len, dec.n_layers, batch.hidden
    B, S, _ = h.shape
    positions = torch.arange(S, device=h.device).unsqueeze(0).expand(B, -1)
    cos, sin = rotary(dec, h, positions)
    for index in range(k, L):
        out = run_layer_weighted(dec, dec.layers[index], h, cos, sin, key_weight)
        h = out if gates is None else h + gates[:, index - k, None, None] * (out - h)
    A = batch.targets.shape[1]
    logp = torch.log_softmax(dec.lm_head(dec.norm(h[:, T - 1:T - 1 + A])).float(), dim=-1)
    return (batch.targets.exp() * (batch.targets - logp)).sum(-1) * batch.valid


def key_weights(batch: Examples, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, S) key weights: 1 on text, ``keep`` (B, n visual; 0/1 or straight-through) on the visual positions."""
    weight = torch.ones(batch.visual_mask.shape, dtype=batch.hidden.dtype, device=batch.hidden.device)
    return weight if keep is None else weight.masked_scatter(batch.visual_mask, keep.to(weight.dtype).reshape(-1))


def router_loss(dec: Decoder, router: MetaRouter, batch: Examples, plan: Plan,
                token_gradient: bool = True) -> torch.Tensor:
    """The module docstring's loss at one operating point, on one batch; with ``token_gradient=False``
    the token mask is the hard top-k alone (no gradient to the token head)."""
    T, k, L = batch.prompt_len, plan.k, dec.n_layers
    prompt_h, prompt_mask = batch.hidden[:, :T], batch.visual_mask[:, :T]
    n_visual = check_batch(prompt_mask)
    n_tokens = keep_count(n_visual, plan.token_ratio)
    keep = None
    if n_tokens < n_visual:
        scores = router.token_scores(prompt_h, prompt_mask)
        keep = straight_through(scores, n_tokens) if token_gradient else top_mask(scores.detach(), n_tokens)
    n_layers = plan.layers_kept(L) - k
    gates = None
    if n_layers < L - k:
        gates = straight_through(router.layer_logits(prompt_h), n_layers).to(batch.hidden.dtype)
    kl = answer_kl(dec, batch, k, key_weights(batch, keep), gates)
    return kl.sum() / batch.valid.sum().clamp_min(1)


def operating_points(token_ratios: list[float], layer_ratios: list[float]) -> list[tuple[float, float]]:
    return [(t, l) for t in token_ratios for l in layer_ratios]


TOKEN_LOSSES = ("straight_through", "contributions")


def train_router(dec: Decoder, router: MetaRouter, examples: Examples, steps: int, lr: float, batch_size: int,
                 seed: int = 0, points: list[tuple[float, float]] | None = None, progress: bool = False,
                 token_loss: str = "straight_through", n_subsets: int = 32,
                 token_sets: str = "random") -> list[float]:
    """AdamW on the router only, ``steps`` steps of ``batch_size`` examples, one operating point per
    step drawn from ``points`` (default: the router's grid without the dense point). ``token_loss``:
    how the token head learns (module docstring); with ``"contributions"`` they are measured first on
    ``n_subsets`` keep-sets per example at the points' token ratios, drawn as ``token_sets`` says
    (:func:`vlmprune.par.contributions.token_contributions`). Returns the loss of every step."""
    if token_loss not in TOKEN_LOSSES:
        raise ValueError(f"unknown token_loss {token_loss!r}; known: {', '.join(TOKEN_LOSSES)}")
    c = router.config
    points = points or [p for p in operating_points(c.token_ratios, c.layer_ratios) if p != (1.0, 1.0)]
    if not points:
        raise ValueError("no operating point prunes anything: add token or layer ratios below 1")
    ranked = token_loss == "contributions"
    token_ratios = sorted({t for t, _ in points if t < 1}, reverse=True)
    contributions = None
    if ranked and token_ratios:
        from vlmprune.par.contributions import token_contributions  # that module builds on this one

        contributions = token_contributions(dec, examples, c.k, token_ratios, n_subsets, seed=seed, progress=progress,
                                            sets=token_sets)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr)
    router.train()
    losses = []
    with frozen(dec):
        bar = tqdm(range(steps), desc="train router", disable=not progress)
        for _ in bar:
            index = torch.randperm(len(examples), generator=generator)[:batch_size]
            batch = examples.batch(index)
            token_ratio, layer_ratio = rng.choice(points)
            loss = torch.zeros(())
            if ranked and token_ratio < 1:
                loss = loss + rank_loss(router, batch, contributions[index])
            if not ranked or layer_ratio < 1:
                loss = loss + router_loss(dec, router, batch, Plan(token_ratio, layer_ratio, c.k),
                                          token_gradient=not ranked)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    router.eval()
    return losses


def rank_loss(router: MetaRouter, batch: Examples, contributions: torch.Tensor) -> torch.Tensor:
    """ListNet: ``- sum_j softmax(z)_j log softmax(s)_j`` averaged over the batch, ``z`` the per-row
    standardised ``contributions`` (B, n) and ``s`` the router's token scores."""
    T = batch.prompt_len
    scores = router.token_scores(batch.hidden[:, :T], batch.visual_mask[:, :T])
    z = (contributions - contributions.mean(1, keepdim=True)) / contributions.std(1, keepdim=True).clamp_min(1e-8)
    return -(torch.softmax(z.to(scores), dim=1) * torch.log_softmax(scores, dim=1)).sum(1).mean()
