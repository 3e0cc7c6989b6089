"""Local pruners and input statistics, checked against the formulas of METHODS.md section 1."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.pruners import (
    PRUNERS,
    InputStats,
    Pruner,
    parse_pattern,
    set_weight_matrix,
    weight_matrix,
)


def make(name: str) -> Pruner:
    return PRUNERS.get(name)()


def stats_from(x: torch.Tensor, need_hessian: bool = True) -> InputStats:
    """InputStats of a Linear whose input is the explicit matrix x (tokens, in)."""
    stats = InputStats(nn.Linear(x.shape[1], 1, bias=False), need_hessian=need_hessian)
    stats.add_batch(x)
    return stats


def correlated_inputs(tokens: int, d_in: int, seed: int) -> torch.Tensor:
    """X = Z @ A with A a low-rank mixing plus a little identity: strongly correlated columns."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, d_in, generator=g)
    low_rank = torch.randn(d_in, 16, generator=g) @ torch.randn(16, d_in, generator=g)
    return z @ (low_rank / 4 + 0.1 * torch.eye(d_in))


# --------------------------------------------------------------------------- registry, patterns


def test_registry_holds_the_three_pruners_with_their_needs():
    assert PRUNERS.names() == ["magnitude", "sparsegpt", "wanda"]
    needs = {n: (PRUNERS.get(n).needs_inputs, PRUNERS.get(n).needs_hessian) for n in PRUNERS.names()}
    assert needs == {
        "magnitude": (False, False),
        "wanda": (True, False),
        "sparsegpt": (True, True),
    }
    for n in PRUNERS.names():
        assert PRUNERS.get(n).name == n


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    assert parse_pattern("1:3") == (1, 3)


@pytest.mark.parametrize("bad", ["", "2-4", "4:2", "0:4", "4:4", "a:b", "2:4:8", "structured"])
def test_parse_pattern_errors_name_the_allowed_forms(bad):
    with pytest.raises(ValueError) as info:
        parse_pattern(bad)
    message = str(info.value)
    assert "unstructured" in message and "N:M" in message and "2:4" in message


# --------------------------------------------------------------------------- InputStats


def test_stats_linear_3d_input_matches_hand_computation():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    batch = torch.randn(2, 5, 6)
    stats = InputStats(layer, need_hessian=True)
    stats.add_batch(batch)

    x = batch.reshape(10, 6)
    assert stats.n_tokens == 10
    expected_sq = torch.tensor([sum(float(x[t, j]) ** 2 for t in range(10)) for j in range(6)])
    torch.testing.assert_close(stats.col_sq_norm, expected_sq)
    torch.testing.assert_close(stats.col_norm, expected_sq.sqrt())
    torch.testing.assert_close(stats.hessian, 2.0 / 10 * x.T @ x)


def test_stats_as_forward_hook():
    torch.manual_seed(1)
    layer = nn.Linear(4, 2)
    stats = InputStats(layer, need_hessian=False)
    handle = layer.register_forward_hook(stats)
    try:
        inp = torch.randn(3, 7, 4)
        layer(inp)
    finally:
        handle.remove()
    assert stats.hessian is None
    assert stats.n_tokens == 21
    torch.testing.assert_close(stats.col_sq_norm, (inp.reshape(-1, 4) ** 2).sum(0))


def test_stats_conv1x1_equals_linear_over_channels():
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 3, kernel_size=1)
    inp = torch.randn(2, 5, 4, 3)
    conv_stats = InputStats(conv, need_hessian=True)
    conv_stats.add_batch(inp)

    lin_stats = InputStats(nn.Linear(5, 3), need_hessian=True)
    lin_stats.add_batch(inp.permute(0, 2, 3, 1))  # (B, H, W, C): the same tokens

    assert conv_stats.n_tokens == lin_stats.n_tokens == 2 * 4 * 3
    torch.testing.assert_close(conv_stats.col_sq_norm, lin_stats.col_sq_norm)
    torch.testing.assert_close(conv_stats.hessian, lin_stats.hessian)


def hand_patches(inp, kh, kw, stride, padding, dilation):
    """Conv patches built with explicit loops, column order (c, i, j) like weight.flatten(1)."""
    b, c, h, w = inp.shape
    padded = F.pad(inp, (padding, padding, padding, padding))
    out_h = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    rows = []
    for n in range(b):
        for y in range(out_h):
            for x in range(out_w):
                rows.append(
                    [
                        padded[n, ch, y * stride + i * dilation, x * stride + j * dilation]
                        for ch in range(c)
                        for i in range(kh)
                        for j in range(kw)
                    ]
                )
    return torch.tensor(rows)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_stats_conv3x3_equals_hand_unfold(stride, padding, dilation):
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, kernel_size=3, stride=stride, padding=padding, dilation=dilation)
    inp = torch.randn(2, 2, 6, 5)
    stats = InputStats(conv, need_hessian=True)
    stats.add_batch(inp)

    x = hand_patches(inp, 3, 3, stride, padding, dilation)
    assert stats.n_tokens == x.shape[0]
    torch.testing.assert_close(stats.col_sq_norm, (x**2).sum(0))
    torch.testing.assert_close(stats.hessian, 2.0 / x.shape[0] * x.T @ x)
    # X W^T + b reproduces the convolution: the column order matches weight.flatten(1).
    out = conv(inp).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(x @ weight_matrix(conv).T + conv.bias, out, atol=1e-5, rtol=1e-5)


def test_stats_running_hessian_equals_one_shot():
    torch.manual_seed(4)
    layer = nn.Linear(7, 2)
    a, b = torch.randn(3, 11, 7), torch.randn(5, 7)
    stats = InputStats(layer, need_hessian=True)
    stats.add_batch(a)
    stats.add_batch(b)
    x = torch.cat([a.reshape(-1, 7), b])
    assert stats.n_tokens == 38
    torch.testing.assert_close(stats.hessian, 2.0 / 38 * x.T @ x)
    torch.testing.assert_close(stats.col_sq_norm, (x**2).sum(0))


def test_weight_matrix_roundtrip_conv():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, kernel_size=3).to(torch.float64)
    w2d = weight_matrix(conv)
    assert w2d.shape == (4, 27) and w2d.dtype == torch.float32
    set_weight_matrix(conv, torch.zeros_like(w2d))
    assert conv.weight.dtype == torch.float64 and conv.weight.shape == (4, 3, 3, 3)
    assert (conv.weight == 0).all()
    with pytest.raises(ValueError):
        set_weight_matrix(conv, torch.zeros(4, 26))


def test_grouped_conv_is_refused():
    with pytest.raises(ValueError):
        InputStats(nn.Conv2d(4, 4, 3, groups=2), need_hessian=False)


# --------------------------------------------------------------------------- Wanda / magnitude


def test_wanda_matches_hand_scores_on_small_layer():
    torch.manual_seed(6)
    w = torch.randn(4, 8)
    x = torch.randn(20, 8) * torch.arange(1, 9)  # columns of very different scale
    new_w, mask = make("wanda").prune(w, stats_from(x, need_hessian=False), 0.5, None)

    col_norm = [math.sqrt(sum(float(x[t, j]) ** 2 for t in range(20))) for j in range(8)]
    for r in range(4):
        scores = [abs(float(w[r, j])) * col_norm[j] for j in range(8)]
        lowest = sorted(range(8), key=lambda j: scores[j])[:4]  # floor(8 * 0.5)
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == set(lowest)
    assert torch.equal(new_w, torch.where(mask, torch.zeros_like(w), w))


@pytest.mark.parametrize("name", ["wanda", "magnitude"])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("d_in", [7, 10, 13])
def test_row_pruners_drop_floor_in_p_lowest_per_row(name, p, d_in):
    torch.manual_seed(7)
    w = torch.randn(5, d_in)
    x = torch.randn(30, d_in)
    new_w, mask = make(name).prune(w, stats_from(x, need_hessian=False), p, None)

    k = math.floor(d_in * p)
    col_norm = (x**2).sum(0).sqrt() if name == "wanda" else torch.ones(d_in)
    scores = w.abs() * col_norm
    for r in range(5):
        lowest = sorted(range(d_in), key=lambda j: float(scores[r, j]))[:k]
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == set(lowest)
        assert int((new_w[r] == 0).sum()) == k
    assert torch.equal(new_w == 0, mask)


def test_magnitude_needs_no_stats():
    w = torch.tensor([[1.0, -3.0, 0.5, 2.0]])
    new_w, mask = make("magnitude").prune(w, None, 0.5, None)
    assert mask.tolist() == [[True, False, True, False]]
    assert new_w.tolist() == [[0.0, -3.0, 0.0, 2.0]]


# --------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_every_group_has_exactly_n_pruned(name, nm):
    n, m = nm
    torch.manual_seed(8)
    w = torch.randn(16, 64)
    x = correlated_inputs(256, 64, seed=8)
    new_w, mask = make(name).prune(w, stats_from(x), 0.0, nm)
    per_group = mask.reshape(16, 64 // m, m).sum(-1)
    assert (per_group == n).all()
    assert (new_w[mask] == 0).all()


def test_nm_needs_in_divisible_by_m():
    with pytest.raises(ValueError):
        make("magnitude").prune(torch.randn(2, 10), None, 0.0, (2, 4))


# --------------------------------------------------------------------------- SparseGPT


def recon_error(x, w, w_pruned):
    return torch.linalg.norm(x @ w.T - x @ w_pruned.T).item()


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4))])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(sparsity, nm):
    torch.manual_seed(9)
    w = torch.randn(32, 256)
    x = correlated_inputs(2048, 256, seed=9)
    stats = stats_from(x)
    errors = {}
    for name in ["magnitude", "wanda", "sparsegpt"]:
        new_w, _ = make(name).prune(w, stats, sparsity, nm)
        errors[name] = recon_error(x, w, new_w)
    assert errors["sparsegpt"] < errors["wanda"]
    assert errors["sparsegpt"] < errors["magnitude"]


def test_sparsegpt_zero_sparsity_leaves_layer_unchanged():
    torch.manual_seed(10)
    w = torch.randn(8, 64)
    new_w, mask = make("sparsegpt").prune(w, stats_from(torch.randn(100, 64)), 0.0, None)
    assert torch.equal(new_w, w)
    assert not mask.any()


@pytest.mark.parametrize("p", [0.5, 0.7])
def test_sparsegpt_sparsity_per_block_and_zeros_at_mask(p):
    torch.manual_seed(11)
    rows, d_in, block = 16, 300, 128  # last block is 44 columns wide
    w = torch.randn(rows, d_in)
    x = correlated_inputs(1024, d_in, seed=11)
    new_w, mask = make("sparsegpt").prune(w, stats_from(x), p, None)
    for i1 in range(0, d_in, block):
        width = min(block, d_in - i1)
        target = int(rows * width * p)
        pruned = int(mask[:, i1 : i1 + width].sum())
        assert target <= pruned <= target + 1
    assert torch.equal(new_w == 0, mask)


def test_sparsegpt_dead_input_column_is_zeroed():
    torch.manual_seed(12)
    x = torch.randn(200, 32)
    x[:, 3] = 0
    w = torch.randn(4, 32)
    new_w, mask = make("sparsegpt").prune(w, stats_from(x), 0.5, None)
    assert (new_w[:, 3] == 0).all() and mask[:, 3].all()
    assert torch.isfinite(new_w).all()


def test_sparsegpt_requires_hessian():
    w = torch.randn(2, 8)
    with pytest.raises(ValueError):
        make("sparsegpt").prune(w, stats_from(torch.randn(10, 8), need_hessian=False), 0.5, None)


# --------------------------------------------------------------------------- determinism, imports


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity,nm", [(0.6, None), (0.0, (2, 4))])
def test_reruns_give_identical_results(name, sparsity, nm):
    torch.manual_seed(13)
    w = torch.randn(8, 128)
    stats = stats_from(correlated_inputs(256, 128, seed=13))
    first_w, first_mask = make(name).prune(w, stats, sparsity, nm)
    second_w, second_mask = make(name).prune(w.clone(), stats, sparsity, nm)
    assert torch.equal(first_mask, second_mask)
    assert torch.equal(first_w, second_w)


def test_pruners_import_no_orchestration_packages():
    code = (
        "import sys, vlmprune.pruners; "
        "bad = [m for m in ('prefect', 'mlflow', 'dvc') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
