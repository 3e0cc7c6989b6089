"""PAR's meta-router: a small learned module that, from the hidden states after layer ``k``, scores
the visual tokens and the later decoder layers (Pruning All-Rounder, seed paper 003; METHODS.md
section 6). One router serves every operating point: a plan keeps the ``floor(n r_t)`` best-scored
tokens and the ``floor(L r_l) - k`` best-scored layers.

With ``u_t = LayerNorm(h_t)`` (no affine parameters) of the hidden states ``h`` after layer ``k``
and ``q = u_T`` the last prompt token (the one that predicts the answer):

- token score of visual token ``j``: ``s_j = w_2^T GELU(W_1 [u_j; q; u_j * q] + b_1) + b_2``;
- layer logits: ``z = V_2 GELU(V_1 [mean_t u_t; q] + c_1) + c_2``, one per layer ``k .. L-1``.

Saved as ``router.safetensors`` (weights) + ``router.json`` (:class:`RouterConfig` and training
facts) in any directory (:func:`save_router`, :func:`load_router`).

Beside the model: a router trained on a saved model (``par.model: pruned`` trains it on the prune
stage's output) records that model's identity, :func:`model_fingerprint` (SHA-256 of ``config.json``
and the weight files), under ``"model"`` in ``router.json``; the register stage then puts the two
router files in a ``router/`` folder next to the weights of the registered model. For any model
directory, :func:`load_model_router` returns its router, and raises :class:`RouterMismatchError`
when the router was trained on another model (the weights or config differ from the recorded ones).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlmprune.errors import ArtifactError, ModelError

WEIGHTS, CONFIG = "router.safetensors", "router.json"
MODEL_ROUTER_DIR = "router"  # the router's folder inside a model directory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class RouterMismatchError(ModelError):
    """The router beside a model was trained on another model."""


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


def model_fingerprint(model_dir: str | Path) -> dict:
    """The identity of a saved model: ``sha256`` over the name, size and bytes of ``config.json`` and
    of every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``) at the top of ``model_dir``,
    in name order. Two directories with the same config and weights get the same fingerprint, whatever
    else (tokenizer, ``router/``) they hold; a single changed weight changes it. Reads every weight
    byte once (about a second per GB)."""
    model_dir = Path(model_dir)
    files = sorted(f for f in model_dir.iterdir()
                   if f.is_file() and (f.name == "config.json" or f.name.endswith(WEIGHT_SUFFIXES)))
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in files):
        raise ArtifactError(f"{model_dir} holds no model weights ({', '.join(WEIGHT_SUFFIXES)}): not a saved model")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return {"sha256": digest.hexdigest(), "files": [f.name for f in files]}


def recorded_fingerprint(router_dir: str | Path) -> str | None:
    """The ``sha256`` of the model a router was trained on, as ``router.json`` records it (None when it
    records none: a router trained on a hub id or a packaged alias)."""
    return (json.loads((Path(router_dir) / CONFIG).read_text()).get("model") or {}).get("sha256")


def load_model_router(model_dir: str | Path, device: str = "cpu") -> MetaRouter:
    """The PAR router saved beside the model in ``model_dir`` (its ``router/`` folder, as the register
    stage writes it with ``par.model: pruned``), after checking that it was trained on this very model:
    the fingerprint recorded in ``router/router.json`` must equal :func:`model_fingerprint` of ``model_dir``.

    Raises :class:`~vlmprune.errors.ArtifactError` when ``model_dir`` has no router, and
    :class:`RouterMismatchError` when its router was trained on another model (or records none)."""
    model_dir = Path(model_dir)
    folder = model_dir / MODEL_ROUTER_DIR
    if not has_router(folder):
        raise ArtifactError(f"no PAR router beside the model in {model_dir} (expected {MODEL_ROUTER_DIR}/{WEIGHTS} "
                            f"and {MODEL_ROUTER_DIR}/{CONFIG}): register the model with par.enabled true and "
                            "par.model pruned, or load a router from its own directory with load_router")
    recorded = recorded_fingerprint(folder)
    actual = model_fingerprint(model_dir)["sha256"]
    if recorded != actual:
        trained_on = f"a model with fingerprint {recorded[:12]}" if recorded else "an unrecorded model"
        raise RouterMismatchError(
            f"the PAR router in {folder} was trained on {trained_on}, not on the model in {model_dir} (fingerprint "
            f"{actual[:12]}): its token and layer choices would not fit this model; retrain it on this model "
            "(par.model pruned, train_router) or load the model it was trained on")
    return load_router(folder, device)
