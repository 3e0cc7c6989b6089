"""A hand-written LLaMA-family prefill/decode loop with visual-token dropping and layer skipping.

Why by hand: dropping visual tokens after layer ``K`` and skipping later layers gives every layer
its own sequence length and cache, which a stock ``generate`` cannot express.

One operating point (:class:`Plan`) is ``(token_ratio, layer_ratio)`` with the split layer ``k``:

- layers ``0 .. k-1`` run on every token (the router reads their output ``h_k``);
- of the ``n`` visual tokens, ``keep_count(n, token_ratio) = floor(n * token_ratio)`` are kept, the
  ones with the highest score (:mod:`vlmprune.par.policies`); text tokens are always kept. Kept
  tokens keep their original positions (rotary phases), as in FastV (Chen et al. 2024,
  arXiv:2403.06764), so layers ``k ..`` run on a shorter sequence with the same causal order;
- of the ``L`` decoder layers, ``keep_count(L, layer_ratio)`` run: the first ``k`` always, and
  the ``keep_count(L, layer_ratio) - k`` later layers chosen by the policy; a skipped layer is the
  identity (``h_{l+1} = h_l``), is never called and has no cache.

Each layer ``l`` computes, as ``LlamaDecoderLayer`` does (Touvron et al. 2023),
``a = h + W_o Attn(RoPE(W_q x), RoPE(W_k x), W_v x)`` with ``x = RMSNorm_1(h)``, and
``h' = a + MLP(RMSNorm_2(a))``; attention is causal softmax(q k^T * scale) v over the layer's cache.
With ratios 1 and 1 this is the dense model (tested against the model's own forward).

Batches must be unpadded (one prompt length; the adapters' VQA prompts are). When samples of a
batch choose different layers, a layer that some sample keeps is computed for the whole batch and
its output gated per sample (``h = keep * layer(h) + (1 - keep) * h``): the outputs are exact, the
saving is not; latency is measured at batch size 1, where skipping is real.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vlmprune.par.decoder import Decoder


def keep_count(n: int, ratio: float) -> int:
    """``floor(n * ratio)``, exact for the decimal ``ratio`` as written (no float rounding)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"keep ratio {ratio} is not in [0, 1]")
    return math.floor(Fraction(repr(float(ratio))) * n)


@dataclass(frozen=True)
class Plan:
    """An operating point: keep ``floor(n * token_ratio)`` visual tokens after layer ``k`` and run
    ``floor(L * layer_ratio)`` layers (the first ``k`` always)."""

    token_ratio: float = 1.0
    layer_ratio: float = 1.0
    k: int = 2

    def layers_kept(self, n_layers: int) -> int:
        n = keep_count(n_layers, self.layer_ratio)
        if n < min(self.k, n_layers):
            raise ValueError(f"layer ratio {self.layer_ratio} keeps {n} of {n_layers} layers, fewer than the "
                             f"{self.k} layers before the router (par.k); raise the ratio or lower par.k")
        return n

    def check(self, n_layers: int) -> None:
        if not 1 <= self.k < n_layers:
            raise ValueError(f"par.k = {self.k}: must be at least 1 and below the {n_layers} decoder layers")
        self.layers_kept(n_layers)

    @property
    def name(self) -> str:
        return f"t{self.token_ratio:g}_l{self.layer_ratio:g}"


@dataclass
class Prefix:
    """The state after the first ``k`` layers, where the policy decides."""

    hidden: torch.Tensor  # (B, T, H): h_k
    k: int
    visual_mask: torch.Tensor  # (B, T) bool
    last_attention: torch.Tensor | None  # (B, T): attention of the last token in layer k-1, mean over heads


@dataclass
class Cache:
    kv: list = field(default_factory=list)  # per layer: (k, v) of shape (B, heads_kv, S_l, d), or None
    layer_keep: torch.Tensor | None = None  # (B, L) bool
    length: int = 0  # position id of the next token
    kept_tokens: int = 0  # sequence length after token dropping


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _qkv(dec: Decoder, layer, h, cos, sin):
    B, T, _ = h.shape
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(B, T, dec.n_heads, dec.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, dec.n_kv_heads, dec.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, dec.n_kv_heads, dec.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _finish(layer, h, out):
    B, _, T, _ = out.shape
    h = h + layer.self_attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def run_layer(dec: Decoder, layer, h, cos, sin, past=None, last_attention: bool = False):
    """One decoder layer on ``h`` (B, T, H) at rotary phases ``cos, sin`` (B, T, d), after the cached
    keys/values ``past``. Returns ``(h', (k, v), attention of the last query or None)``."""
    q, k, v = _qkv(dec, layer, h, cos, sin)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    groups = dec.n_heads // dec.n_kv_heads
    kr, vr = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scale = layer.self_attn.scaling
    if past is not None and q.shape[2] > 1:
        raise NotImplementedError("chunked prefill after a cache is not supported: decode one token at a time")
    out = F.scaled_dot_product_attention(q, kr, vr, is_causal=past is None and q.shape[2] > 1, scale=scale)
    row = None
    if last_attention:  # the last query sees every key (causal), so no mask is needed
        row = torch.softmax((q[:, :, -1:] @ kr.transpose(-1, -2)).float() * scale, dim=-1)[:, :, 0].mean(1)
    return _finish(layer, h, out), (k, v), row


def run_layer_weighted(dec: Decoder, layer, h, cos, sin, key_weight: torch.Tensor):
    """A decoder layer over the full sequence where key ``j`` enters attention row ``i`` with weight
    ``w_ij = m_j`` (``w_ii = 1``), ``m`` (B, T): ``A'_ij = A_ij w_ij / sum_j' A_ij' w_ij'`` with ``A``
    the causal softmax.

    With ``m`` in {0, 1} the rows of kept tokens are exactly attention restricted to the kept keys, so
    the kept positions get the same outputs as the token-dropped loop (tested); a dropped token's own
    row (never read by a kept one) keeps its diagonal so that it stays finite even when every earlier
    token is dropped. With a straight-through ``m`` gradients reach the token scores
    (:mod:`vlmprune.par.train`)."""
    q, k, v = _qkv(dec, layer, h, cos, sin)
    groups = dec.n_heads // dec.n_kv_heads
    kr, vr = _repeat_kv(k, groups), _repeat_kv(v, groups)
    T = h.shape[1]
    scores = (q @ kr.transpose(-1, -2)) * layer.self_attn.scaling
    causal = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    weight = key_weight[:, None, None, :].to(probs.dtype).expand(-1, 1, T, -1)
    weight = torch.where(torch.eye(T, dtype=torch.bool, device=h.device), torch.ones_like(weight), weight)
    probs = probs * weight
    probs = probs / probs.sum(-1, keepdim=True)
    return _finish(layer, h, probs @ vr)


def rotary(dec: Decoder, h: torch.Tensor, positions: torch.Tensor):
    return dec.rotary(h, positions)


def run_prefix(dec: Decoder, embeds: torch.Tensor, visual_mask: torch.Tensor, k: int,
               want_attention: bool = False, cache: Cache | None = None) -> Prefix:
    """Layers ``0 .. k-1`` on every token; fills ``cache`` (if given) with their keys/values."""
    B, T, _ = embeds.shape
    positions = torch.arange(T, device=embeds.device).unsqueeze(0).expand(B, -1)
    cos, sin = rotary(dec, embeds, positions)
    h, row = embeds, None
    for index in range(k):
        h, kv, r = run_layer(dec, dec.layers[index], h, cos, sin, last_attention=want_attention and index == k - 1)
        row = r if r is not None else row
        if cache is not None:
            cache.kv.append(kv)
    return Prefix(h, k, visual_mask, row)


def kept_positions(visual_mask: torch.Tensor, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted positions (B, T - n + n_keep) of every text token and the ``n_keep`` visual tokens with
    the highest ``scores`` (B, n), ties broken towards the earlier token."""
    B, T = visual_mask.shape
    n = scores.shape[1]
    visual = visual_mask.nonzero()[:, 1].view(B, n)
    top = torch.topk(scores, n_keep, dim=1, sorted=False).indices if n_keep < n else torch.arange(n).expand(B, -1)
    keep = torch.ones(B, T, dtype=torch.bool, device=visual_mask.device)
    keep.scatter_(1, visual, False)
    keep.scatter_(1, visual.gather(1, top.to(visual.device)), True)
    return keep.nonzero()[:, 1].view(B, -1)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def drop_tokens(h: torch.Tensor, visual_mask: torch.Tensor, scores: torch.Tensor, n_keep: int):
    """``h`` (B, T, H) cut to every text token and the ``n_keep`` visual tokens with the highest
    ``scores`` (B, n). Returns ``(h', kept positions (B, T'))``; the positions are the tokens' original
    ones, so their rotary phases do not change."""
    index = kept_positions(visual_mask, scores, n_keep)
    return _gather(h, index), index


def dropped_forward(dec: Decoder, embeds: torch.Tensor, visual_mask: torch.Tensor, k: int, scores: torch.Tensor,
                    n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-dropped prompt pass with every layer run, differentiable (:func:`prefill` without the
    cache, the layer skipping and ``no_grad``): layers ``0 .. k-1`` on every token, then
    :func:`drop_tokens`. Returns the last layer's output (B, T', H), before the final norm, and the
    kept positions (B, T')."""
    h, positions = drop_tokens(run_prefix(dec, embeds, visual_mask, k).hidden, visual_mask, scores, n_keep)
    cos, sin = rotary(dec, h, positions)
    for layer in dec.layers[k:]:
        h = run_layer(dec, layer, h, cos, sin)[0]
    return h, positions


def _apply(dec, layer_index, h, cos, sin, cache: Cache, past=None):
    """Run layer ``layer_index`` honouring ``cache.layer_keep``; returns the new ``h``."""
    keep = cache.layer_keep[:, layer_index]
    if not bool(keep.any()):
        if past is None:
            cache.kv.append(None)
        return h
    out, kv, _ = run_layer(dec, dec.layers[layer_index], h, cos, sin, past=past)
    if past is None:
        cache.kv.append(kv)
    else:
        cache.kv[layer_index] = kv
    return out if bool(keep.all()) else torch.where(keep[:, None, None], out, h)


def check_batch(visual_mask: torch.Tensor) -> int:
    counts = visual_mask.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("every sample of a batch must have the same number of visual tokens")
    return int(counts[0]) if counts.numel() else 0


@torch.no_grad()
def prefill(dec: Decoder, embeds: torch.Tensor, visual_mask: torch.Tensor, plan: Plan, policy=None):
    """Prompt pass under ``plan``; returns the next-token logits (B, V) and the :class:`Cache`.

    ``policy`` (see :mod:`vlmprune.par.policies`) scores visual tokens and layers after layer
    ``plan.k``; it is not called when the plan keeps everything."""
    L = dec.n_layers
    plan.check(L)
    n_visual = check_batch(visual_mask)
    n_tokens = keep_count(n_visual, plan.token_ratio)
    n_layers = plan.layers_kept(L)
    if policy is None and (n_tokens < n_visual or n_layers < L):
        raise ValueError(f"plan {plan.name} prunes but no policy (router, attention, random) was given")
    B, T, _ = embeds.shape
    cache = Cache(length=T)
    prefix = run_prefix(dec, embeds, visual_mask, plan.k,
                        want_attention=n_tokens < n_visual and getattr(policy, "needs_attention", False),
                        cache=cache)
    h = prefix.hidden
    positions = torch.arange(T, device=embeds.device).unsqueeze(0).expand(B, -1)
    if n_tokens < n_visual:
        h, positions = drop_tokens(h, visual_mask, policy.token_scores(prefix, n_tokens), n_tokens)
    cos, sin = rotary(dec, h, positions)
    keep = torch.ones(B, L, dtype=torch.bool, device=embeds.device)
    if n_layers < L:
        keep[:, plan.k:] = policy.layer_keep(prefix, n_layers - plan.k, L)
    cache.layer_keep, cache.kept_tokens = keep, h.shape[1]
    for index in range(plan.k, L):
        h = _apply(dec, index, h, cos, sin, cache)
    return dec.lm_head(dec.norm(h[:, -1])), cache


@torch.no_grad()
def decode(dec: Decoder, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
    """One generated token per sample (B,) through the cached layers; returns logits (B, V)."""
    h = dec.embed_tokens(tokens).unsqueeze(1)
    positions = torch.full((h.shape[0], 1), cache.length, dtype=torch.long, device=h.device)
    cos, sin = rotary(dec, h, positions)
    for index in range(dec.n_layers):
        past = cache.kv[index]
        if past is None:
            continue
        h = _apply(dec, index, h, cos, sin, cache, past=past)
    cache.length += 1
    cache.kept_tokens += 1
    return dec.lm_head(dec.norm(h[:, -1]))


def _eos_ids(dec: Decoder) -> set[int]:
    eos = dec.eos_token_id
    return set() if eos is None else {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


@torch.no_grad()
def generate(dec: Decoder, input_ids: torch.Tensor, pixel_values: torch.Tensor, plan: Plan, policy=None,
             max_new_tokens: int = 4, pad_token_id: int = 0) -> torch.Tensor:
    """Greedy answers (B, max_new_tokens); after EOS a sample gets ``pad_token_id``."""
    embeds = dec.embed_inputs(input_ids, pixel_values)
    logits, cache = prefill(dec, embeds, dec.visual_mask(input_ids), plan, policy)
    eos, out = _eos_ids(dec), []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out.append(token)
        done |= torch.tensor([int(t) in eos for t in token.tolist()], device=done.device)
        if step + 1 < max_new_tokens and not bool(done.all()):
            logits = decode(dec, token, cache)
        elif step + 1 < max_new_tokens:
            out.extend([torch.full_like(token, pad_token_id)] * (max_new_tokens - step - 1))
            break
    return torch.stack(out, dim=1)
