"""Saving and loading structurally pruned models.

transformers configs hold one head count and one FFN width for all layers, so a pruned model's
``config.json`` keeps the dense parent's architecture and adds ``structure``: per tower, the kept
layers (indices in the parent) and each kept layer's head count and width
(:func:`vlmprune.structured.surgery.current_structure`). Loading builds the parent from the
config, cuts it with :func:`~vlmprune.structured.surgery.apply_structure` and loads the (smaller)
weights.

- The offline dual encoder does this itself: ``DualEncoderConfig.structure`` is applied in
  ``DualEncoder.__init__``, so ``DualEncoder.from_pretrained`` reloads a pruned model unchanged.
- ``CLIPModel``: ``structure`` is stored as an extra attribute of the ``CLIPConfig``; load with
  :func:`load_structured_clip` (``CLIPModel.from_pretrained`` refuses the smaller tensors).
- LLaMA-style causal LMs: likewise an extra attribute of the model's config (the tower
  ``language``; ``heads`` counts KV heads, each with ``num_attention_heads / num_key_value_heads``
  query heads); load with :func:`load_structured_causal_lm`, which the ``causal_lm`` adapter calls
  for a directory whose config.json has ``structure``. ``num_hidden_layers`` stays the parent's
  (the parent is rebuilt from it); the kept layers are renumbered for the KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from vlmprune.structured.surgery import apply_structure, current_structure


def saved_structure(model_id: str | Path) -> dict | None:
    """The ``structure`` entry of a saved model's config.json (None for a dense or remote model)."""
    try:
        return json.loads((Path(model_id) / "config.json").read_text()).get("structure") or None
    except (OSError, ValueError, AttributeError):
        return None


def record_structure(model: nn.Module) -> dict:
    """Store the model's current structure in its config, so that saving it keeps the shapes."""
    structure = current_structure(model)
    model.config.structure = structure
    return structure


def load_structured_clip(model_id: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the dense parent CLIPModel from the config, cut it to ``structure``, load the weights."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(model_id)
    config = CLIPConfig.from_pretrained(str(path))
    structure = getattr(config, "structure", None) or saved_structure(path)
    if not structure:
        raise ValueError(f"{model_id} has no 'structure' in config.json: load it with CLIPModel.from_pretrained")
    return _load_weights(apply_structure(CLIPModel(config), structure), path, dtype)


def load_structured_causal_lm(model_id: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the dense parent causal LM from the config, cut it to ``structure``, load the weights
    (tied input/output embeddings are tied again after loading)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_id)
    config = AutoConfig.from_pretrained(str(path))
    structure = getattr(config, "structure", None) or saved_structure(path)
    if not structure:
        raise ValueError(f"{model_id} has no 'structure' in config.json: load it with AutoModelForCausalLM.from_pretrained")
    model = AutoModelForCausalLM.from_config(config)
    return _load_weights(apply_structure(model, structure), path, dtype)


def _load_weights(model: nn.Module, path: Path, dtype: torch.dtype) -> nn.Module:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in missing if not k.endswith("position_ids") and k not in tied]
    if missing or unexpected:
        raise ValueError(f"weights of {path} do not match its structure: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that share their tensor with an earlier one (save_pretrained writes one copy)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied
