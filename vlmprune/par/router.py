"""PAR's meta-router: a small learned module that, from the hidden states after layer ``k``, scores
the visual tokens and the later decoder layers (Pruning All-Rounder, seed paper 003; METHODS.md
section 6). One router serves every operating point: a plan keeps the ``floor(n r_t)`` best-scored
tokens and the ``floor(L r_l) - k`` best-scored layers.

With ``u_t = LayerNorm(h_t)`` (no affine parameters) of the hidden states ``h`` after layer ``k``
and ``q = u_T`` the last prompt token (the one that predicts the answer):

- token score of visual token ``j``: ``s_j = w_2^T GELU(W_1 [u_j; q; u_j * q] + b_1) + b_2``;
- layer logits: ``z = V_2 GELU(V_1 [mean_t u_t; q] + c_1) + c_2``, one per layer ``k .. L-1``.

Saved as ``router.safetensors`` (weights) + ``router.json`` (:class:`RouterConfig` and training
facts), beside the model or in any directory (:func:`save_router`, :func:`load_router`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

WEIGHTS, CONFIG = "router.safetensors", "router.json"


@dataclass
class RouterConfig:
    hidden_size: int
    n_layers: int  # decoder layers of the language model (L)
    k: int  # the router reads h_k, the output of layer k-1
    width: int = 128
    token_ratios: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    layer_ratios: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])


class MetaRouter(nn.Module):
    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        hidden, width = config.hidden_size, config.width
        self.token_head = nn.Sequential(nn.Linear(3 * hidden, width), nn.GELU(), nn.Linear(width, 1))
        self.layer_head = nn.Sequential(nn.Linear(2 * hidden, width), nn.GELU(),
                                        nn.Linear(width, config.n_layers - config.k))

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = self.token_head[0].weight.dtype
        return F.layer_norm(hidden.to(dtype), hidden.shape[-1:])

    def token_scores(self, hidden: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        """Scores (B, n) of the ``n`` visual tokens (same count in every sample), in sequence order."""
        u = self._normed(hidden)
        B = u.shape[0]
        visual = u[visual_mask].view(B, -1, u.shape[-1])
        q = u[:, -1:].expand_as(visual)
        return self.token_head(torch.cat([visual, q, visual * q], dim=-1)).squeeze(-1)

    def layer_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, L - k) of running each layer ``k .. L-1``."""
        u = self._normed(hidden)
        return self.layer_head(torch.cat([u.mean(1), u[:, -1]], dim=-1))


def save_router(router: MetaRouter, directory: str | Path, **facts) -> Path:
    """Write ``router.safetensors`` and ``router.json`` (config + ``facts``) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()}, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps({"config": asdict(router.config), **facts}, indent=2) + "\n")
    return directory


def has_router(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS).exists() and (Path(directory) / CONFIG).exists()


def load_router(directory: str | Path, device: str = "cpu") -> MetaRouter:
    """The router saved in ``directory`` (e.g. the model directory), in eval mode."""
    directory = Path(directory)
    if not has_router(directory):
        raise FileNotFoundError(f"no PAR router in {directory}: expected {WEIGHTS} and {CONFIG} "
                                "(train one with the train_router stage)")
    meta = json.loads((directory / CONFIG).read_text())
    router = MetaRouter(RouterConfig(**meta["config"]))
    router.load_state_dict(load_file(str(directory / WEIGHTS)))
    return router.to(device).eval()
