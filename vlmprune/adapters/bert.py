"""Adapter for BERT-style text encoders loaded with ``AutoModel`` (BERT, RoBERTa, MiniLM, MPNet, ...),
used as sentence encoders: mean-pooled (over the attention mask), L2-normalised last hidden states.

Tower: ``text`` = the encoder layers (``encoder.layer``). Embeddings and pooler are not pruned.

Calibration loss (self-supervised, needs no labels and no MLM head, which ``AutoModel`` lacks):
an *adjacent-span* contrastive loss. Each calibration window of ``data.seq_len`` tokens is cut into
its first and second half, each wrapped in the tokenizer's special tokens ([CLS] ... [SEP]); with
e_a, e_b the normalised mean-pooled embeddings of the halves of the B windows of a batch,

    loss = 1/2 [CE(e_a e_b^T / tau, I) + CE(e_b e_a^T / tau, I)],   tau = 0.05,

the symmetric InfoNCE loss that trains sentence encoders (in-batch negatives; the halves of one
passage are the positive pair, as in DeCLUTR). It needs batches of at least 2 windows.

Evaluation on the held-out windows: ``span_r1`` (fraction of first halves whose nearest second half,
among all held-out windows, is their own; averaged with the reverse direction) and ``span_loss``
(the loss above over all held-out windows at once); outputs: the span embeddings (cosine fidelity).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmprune.adapters.base import ADAPTERS, LoadedModel, ModelAdapter, Tower
from vlmprune.adapters.causal_lm import architectures, find_layer_list, read_config
from vlmprune.data.spec import DataSpec
from vlmprune.data.text import calibration_windows, eval_windows, require_text

TEMPERATURE = 0.05
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "camembert", "ernie",
                 "megatron-bert", "roformer", "data2vec-text", "nomic_bert", "modernbert", "deberta", "deberta-v2"}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised mean-pooled sentence embeddings (float32)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(mean_pool(hidden, attention_mask).float(), dim=-1)


def span_contrastive_loss(e_a: torch.Tensor, e_b: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    if e_a.shape[0] < 2:
        raise ValueError("the bert contrastive loss needs batches of at least 2 windows: raise scoring.batch_size")
    logits = e_a @ e_b.T / temperature
    target = torch.arange(len(e_a), device=e_a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text ([CLS], [SEP] for BERT)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def _spans(tokenizer, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's two halves, wrapped in the tokenizer's special tokens: two (n, L/2 + specials) tensors."""
    half = windows.shape[1] // 2
    before, after = special_tokens(tokenizer)
    before, after = torch.tensor(before, dtype=torch.long), torch.tensor(after, dtype=torch.long)
    n = len(windows)
    a = torch.cat([before.expand(n, -1), windows[:, :half], after.expand(n, -1)], dim=1)
    b = torch.cat([before.expand(n, -1), windows[:, half:2 * half], after.expand(n, -1)], dim=1)
    return a, b


@ADAPTERS.register("bert")
class BertAdapter(ModelAdapter):
    family = "bert"

    def load(self, model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(model_id, dtype=dtype).to(device).eval()
        return LoadedModel(model, AutoTokenizer.from_pretrained(model_id))

    def towers(self, model: nn.Module) -> list[Tower]:
        path, layers = find_layer_list(model, getattr(model.config, "num_hidden_layers", None),
                                       paths=("encoder.layer", "encoder.layers", "transformer.layer", "layers"))
        groups = [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]
        return [Tower("text", groups, lambda m, b: m(input_ids=torch.cat([b["input_ids_a"], b["input_ids_b"]])))]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return span_contrastive_loss(embed(model, batch["input_ids_a"]), embed(model, batch["input_ids_b"]))

    @classmethod
    def matches(cls, model_id: str) -> bool:
        config = read_config(model_id)
        if config is None or config.model_type not in ENCODER_TYPES:
            return False
        return not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures(config))

    def _check_length(self, loaded: LoadedModel, spec: DataSpec) -> None:
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        extra = sum(map(len, special_tokens(loaded.processor)))
        if limit is not None and spec.seq_len // 2 + extra > limit:
            raise ValueError(f"data.seq_len={spec.seq_len}: each half window ({spec.seq_len // 2} tokens + {extra} "
                             f"special) exceeds the model's {limit} positions; lower data.seq_len to at most "
                             f"{2 * (limit - extra)}")

    def make_calibration(self, loaded: LoadedModel, spec: DataSpec, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``n_samples`` windows of ``data.seq_len`` tokens at seeded offsets of the calibration text, as
        two wrapped halves ``input_ids_a``/``input_ids_b`` (no padding, so no attention mask)."""
        require_text(spec, self.family)
        self._check_length(loaded, spec)
        windows, starts = calibration_windows(loaded.processor, spec, n_samples, seed)
        a, b = _spans(loaded.processor, windows)
        return {"index": starts, "input_ids_a": a, "input_ids_b": b}

    @torch.no_grad()
    def evaluate(self, loaded: LoadedModel, spec: DataSpec, batch_size: int, max_samples: int | None,
                 device: str, progress: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Adjacent-span retrieval and contrastive loss on the held-out windows (non-overlapping)."""
        require_text(spec, self.family)
        self._check_length(loaded, spec)
        windows, _ = eval_windows(loaded.processor, replace(spec, stride=None), max_windows=max_samples)
        if len(windows) < 2:
            raise ValueError("bert evaluation needs at least 2 held-out windows: raise data.eval_windows or "
                             "evaluation.max_samples, or lower data.seq_len")
        a, b = _spans(loaded.processor, windows)
        e_a = torch.cat([embed(loaded.model, a[s:s + batch_size].to(device)).cpu() for s in range(0, len(a), batch_size)])
        e_b = torch.cat([embed(loaded.model, b[s:s + batch_size].to(device)).cpu() for s in range(0, len(b), batch_size)])
        similarity = e_a @ e_b.T
        target = torch.arange(len(e_a))
        r1 = ((similarity.argmax(1) == target).float().mean() + (similarity.argmax(0) == target).float().mean()) / 2
        metrics = {"span_r1": float(r1), "span_loss": float(span_contrastive_loss(e_a, e_b))}
        return metrics, {"text": torch.cat([e_a, e_b])}
