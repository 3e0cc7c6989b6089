"""Running statistics of one prunable layer's input, and the layer <-> matrix view.

A prunable layer is an ``nn.Linear`` or an ``nn.Conv2d`` with ``groups == 1``.
Both are seen as a matrix product ``Y = X W^T`` with W of shape (out, in) and
X of shape (tokens, in):

- Linear: X is the input with all leading dims flattened, in = in_features.
- Conv2d: X holds the input patches, ``torch.nn.functional.unfold`` with the
  layer's kernel_size, dilation, padding and stride, so in = C * kh * kw in the
  order of ``weight.flatten(1)``. A 1x1 kernel with stride 1 and no padding is
  a plain reshape over channels, (B*H*W, C).

Statistics (all float32, like both reference codes):

- ``n_tokens``: number of rows of X seen so far.
- ``col_sq_norm[j] = sum_t X[t, j]^2``; its square root is Wanda's ||X_j||_2
  (Sun et al. 2023, locuslab/wanda ``lib/layerwrapper.py``).
- ``hessian = (2 / n_tokens) X^T X``, kept as a running average the way
  SparseGPT's ``add_batch`` does (Frantar & Alistarh 2023, IST-DASLab/sparsegpt
  ``sparsegpt.py``): ``H <- H * n_old / n_new + (2 / n_new) X_b^T X_b``.

The references divide by the number of *sequences* rather than tokens; a
constant factor on H or on ||X_j|| changes neither the masks nor the SparseGPT
update (the damping is relative to mean(diag H)), so counting tokens is
equivalent and easier to check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_layer(layer: nn.Module) -> None:
    if isinstance(layer, nn.Linear):
        return
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"Conv2d with groups={layer.groups} is not prunable here; only groups=1")
        if layer.padding == "same" or layer.padding_mode != "zeros":
            raise ValueError(
                "Conv2d needs numeric or 'valid' padding with padding_mode='zeros'; "
                f"got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
            )
        return
    raise TypeError(f"prunable layers are nn.Linear or nn.Conv2d; got {type(layer).__name__}")


def _conv_padding(layer: nn.Conv2d) -> tuple[int, int]:
    return (0, 0) if layer.padding == "valid" else tuple(layer.padding)


def weight_matrix(layer: nn.Module) -> Tensor:
    """Return a float32 copy of the layer's weight as an (out, in) matrix.

    Linear: ``weight``; Conv2d: ``weight.flatten(1)`` (in = C * kh * kw).
    """
    _check_layer(layer)
    return layer.weight.detach().flatten(1).to(torch.float32, copy=True)


def set_weight_matrix(layer: nn.Module, w2d: Tensor) -> None:
    """Write an (out, in) matrix back into the layer, in its own dtype and shape."""
    _check_layer(layer)
    weight = layer.weight
    expected = (weight.shape[0], weight[0].numel())
    if tuple(w2d.shape) != expected:
        raise ValueError(f"weight matrix of shape {tuple(w2d.shape)} does not fit layer {expected}")
    with torch.no_grad():
        weight.copy_(w2d.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))


def input_matrix(layer: nn.Module, inp: Tensor) -> Tensor:
    """Turn the raw input a layer received into the 2-D X (tokens, in) with Y = X W^T."""
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        return inp.reshape(-1, layer.in_features)
    if inp.dim() == 3:  # unbatched (C, H, W)
        inp = inp.unsqueeze(0)
    padding = _conv_padding(layer)
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and padding == (0, 0):
        return inp.permute(0, 2, 3, 1).reshape(-1, layer.in_channels)
    patches = F.unfold(
        inp,
        kernel_size=layer.kernel_size,
        dilation=layer.dilation,
        padding=padding,
        stride=layer.stride,
    )  # (B, C*kh*kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class InputStats:
    """Running statistics of one layer's input (see the module docstring).

    Feed it from a forward hook: ``layer.register_forward_hook(stats)`` works,
    since calling the object with ``(module, inputs, output)`` calls
    ``add_batch(inputs[0])``.
    """

    def __init__(self, layer: nn.Module, need_hessian: bool) -> None:
        _check_layer(layer)
        self.layer = layer
        self.need_hessian = need_hessian
        self.in_features = layer.weight[0].numel()
        device = layer.weight.device
        self.n_tokens = 0
        self.col_sq_norm = torch.zeros(self.in_features, dtype=torch.float32, device=device)
        self.hessian: Tensor | None = None
        if need_hessian:
            self.hessian = torch.zeros(
                (self.in_features, self.in_features), dtype=torch.float32, device=device
            )

    @torch.no_grad()
    def add_batch(self, inp: Tensor) -> None:
        """Accumulate one batch of the layer's raw input."""
        x = input_matrix(self.layer, inp.detach()).to(
            device=self.col_sq_norm.device, dtype=torch.float32
        )
        n_new = self.n_tokens + x.shape[0]
        if n_new == 0:
            return
        self.col_sq_norm += (x * x).sum(dim=0)
        if self.hessian is not None:
            self.hessian *= self.n_tokens / n_new
            self.hessian += (2.0 / n_new) * (x.T @ x)
        self.n_tokens = n_new

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        self.add_batch(inputs[0])

    @property
    def col_norm(self) -> Tensor:
        """||X_j||_2 over all tokens seen, shape (in,)."""
        return self.col_sq_norm.sqrt()
