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
    model = CLIPModel(config)
    apply_structure(model, structure)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_id}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"weights of {model_id} do not match its structure: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(dtype).eval()
