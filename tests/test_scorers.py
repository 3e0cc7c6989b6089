"""Scorers (ECoFLaP stage 1, METHODS.md section 2) checked against their formulas on tiny models."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

from vlmprune.scorers import SCORERS, VARIANTS, ScoreResult
from vlmprune.scorers.base import LossFn
from vlmprune.scorers.block_cache import BlockCache
from vlmprune.scorers.zeroth_order import directional_derivative_sums

zeroth_order = SCORERS.get("zeroth_order")
first_order = SCORERS.get("first_order")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- tiny models


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def mlp(dominant: int | None = None, c: float = 30.0) -> nn.Sequential:
    """Four residual Linear-ReLU-Linear blocks.

    With ``dominant`` set, that block's fc1 (weight and bias) is scaled up by c
    and its fc2 down by c. ReLU is positively homogeneous, so the network
    computes the same function and every other block's gradient is unchanged,
    while the block's fc2 gradient grows by c (its fc1 gradient shrinks by c):
    its gradient dominates unambiguously.
    """
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(8, 16) for _ in range(4)])
    if dominant is not None:
        with torch.no_grad():
            block = model[dominant]
            block.fc1.weight.mul_(c)
            block.fc1.bias.mul_(c)
            block.fc2.weight.div_(c)
    return model


def mlp_groups(model):
    return {f"block{i}": {f"{i}.fc1": b.fc1, f"{i}.fc2": b.fc2} for i, b in enumerate(model)}


def mlp_loss(model, batch):
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def mlp_batches(n=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(16, 8, generator=gen, dtype=dtype), "y": torch.randn(16, 8, generator=gen, dtype=dtype)}
        for _ in range(n)
    ]


def llama(factors=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    if factors is not None:
        with torch.no_grad():
            for layers, f in zip(llama_groups(model).values(), factors):
                for layer in layers.values():
                    layer.weight.mul_(f)
    return model


def llama_groups(model):
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return {
        f"layer{i}": {f"model.layers.{i}.{n}": layer.get_submodule(n) for n in names}
        for i, layer in enumerate(model.model.layers)
    }


def llama_loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


def llama_batches(n=2):
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (2, 16), generator=gen)} for _ in range(n)]


def hand_gradients(model, groups, loss_fn, batches):
    """Per batch, {layer: gradient} by plain loss.backward()."""
    layers = {name: m for members in groups.values() for name, m in members.items()}
    out = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        out.append({name: m.weight.grad.detach().clone() for name, m in layers.items()})
    model.zero_grad(set_to_none=True)
    return out


def batch_group_norms(members, truth) -> list[float]:
    """||g_gb||_2 per batch b: the L2 norm of the whole gradient of the group whose layers are ``members``."""
    return [math.sqrt(sum(float(t[n].square().sum()) for n in members)) for t in truth]


def group_l2(groups, truth) -> dict[str, float]:
    """sum_b ||g_gb||_2: the L2 norm of each group's whole gradient, summed over batches."""
    return {g: sum(batch_group_norms(members, truth)) for g, members in groups.items()}


def ranking(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=scores.get, reverse=True)


# ---------------------------------------------------------------- ranking on a constructed case


def test_dominant_block_ranks_first_for_every_scorer():
    model = mlp(dominant=2)
    groups, batches = mlp_groups(model), mlp_batches()
    truth = hand_gradients(model, groups, mlp_loss, batches)
    block_norm = group_l2(groups, truth)
    others = max(v for g, v in block_norm.items() if g != "block2")
    assert block_norm["block2"] > 5 * others  # the construction makes it unambiguous

    results = {
        "zo-group": zeroth_order(model, groups, mlp_loss, batches, granularity="group", n_directions=4),
        "zo-tensor": zeroth_order(model, groups, mlp_loss, batches, granularity="tensor", n_directions=4),
        "fo-l1": first_order(model, groups, mlp_loss, batches),
        "fo-l2": first_order(model, groups, mlp_loss, batches, norm="l2"),
        "fo-l2-group": first_order(model, groups, mlp_loss, batches, norm="l2_group"),
    }
    for name, result in results.items():
        assert ranking(result.group_scores)[0] == "block2", name


# ---------------------------------------------------------------- first order against backward()


@pytest.mark.parametrize(
    "variant,norm",
    [("grad", "l1"), ("grad", "l2"), ("grad", "l2_group"), ("weight_grad", "l1"), ("weight_grad_sq", "l1")],
)
def test_first_order_matches_hand_gradients(variant, norm):
    model = llama()
    groups, batches = llama_groups(model), llama_batches()
    truth = hand_gradients(model, groups, llama_loss, batches)
    weights = {n: m.weight.detach() for members in groups.values() for n, m in members.items()}
    group_of = {n: g for g, members in groups.items() for n in members}

    def per_batch(name, t):
        w, g = weights[name], t[name]
        if variant == "grad" and norm == "l2_group":  # the layer's share of its group's norm
            (group_norm,) = batch_group_norms(groups[group_of[name]], [t])
            return float(g.square().sum()) / group_norm
        if variant == "grad":
            return g.abs().sum() if norm == "l1" else g.norm()
        if variant == "weight_grad":
            return (w * g).abs().sum()
        return (w * g).square().sum()

    expected = {n: sum(float(per_batch(n, t)) for t in truth) for n in weights}
    if norm == "l2_group":  # the group score is sum_b ||g_gb||, computed here without the layer split
        assert group_l2(groups, truth) == pytest.approx(
            {g: sum(expected[n] for n in members) for g, members in groups.items()}, rel=1e-9)
    result = first_order(model, groups, llama_loss, batches, variant=variant, norm=norm)
    assert set(result.layer_scores) == set(expected)
    for name, value in expected.items():
        assert result.layer_scores[name] == pytest.approx(value, rel=1e-5), name
    for group, members in groups.items():
        assert result.group_scores[group] == pytest.approx(sum(expected[n] for n in members), rel=1e-6)
    assert (result.forward_passes, result.backward_passes) == (len(batches), len(batches))


def test_first_order_never_holds_the_full_gradient_set():
    model = llama()
    groups, batches = llama_groups(model), llama_batches(1)
    prunable = [m.weight for members in groups.values() for m in members.values()]
    held = []
    # registered before the scorer's own hooks, so these run first, with the fresh gradient in place
    handles = [w.register_post_accumulate_grad_hook(lambda p: held.append(sum(q.grad is not None for q in prunable)))
               for w in prunable]
    try:
        first_order(model, groups, llama_loss, batches)
    finally:
        for h in handles:
            h.remove()
    assert len(held) == len(prunable) and max(held) == 1
    assert all(p.grad is None for p in model.parameters())  # nothing else got a gradient either


def test_first_order_checkpointing_same_scores_and_undone():
    model = llama()
    groups, batches = llama_groups(model), llama_batches()
    modes = {n: m.training for n, m in model.named_modules()}
    calls = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    plain = first_order(model, groups, llama_loss, batches)
    n_plain = len(calls)
    ckpt = first_order(model, groups, llama_loss, batches, checkpointing=True)
    hook.remove()
    assert len(calls) - n_plain == 2 * n_plain  # the block really was recomputed in backward
    assert ckpt.forward_passes == 2 * len(batches) and ckpt.backward_passes == len(batches)
    for name, value in plain.layer_scores.items():
        assert ckpt.layer_scores[name] == pytest.approx(value, rel=1e-5)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not getattr(model, "_require_grads_hooks", None)
    assert {n: m.training for n, m in model.named_modules()} == modes


# ---------------------------------------------------------------- zeroth order against the formula


def test_zeroth_order_tensor_estimate_matches_gradient_norms():
    """K directions per batch: s_l = sum_b mean_k |d_lbk| with d_lbk = g_lb . z ~ N(0, sigma_b^2).

    sigma_b = ||g_lb||_2. |N(0, s^2)| has mean s sqrt(2/pi) and standard
    deviation s sqrt(1 - 2/pi), so
        E[s_l]   = sqrt(2/pi) sum_b sigma_b,
        Var[s_l] = (1 - 2/pi) / K * sum_b sigma_b^2
    (relative std at most sqrt((pi - 2) / 2) / sqrt(K), about 4.4% at K = 300).
    We allow 4 standard deviations. float64 keeps the finite-difference error
    (O(eps^2) for a smooth loss, tiny kink crossings for ReLU) far below that.
    """
    model = mlp().double()
    groups, batches = mlp_groups(model), mlp_batches(2, torch.float64)
    k = 300
    truth = hand_gradients(model, groups, mlp_loss, batches)
    result = zeroth_order(model, groups, mlp_loss, batches, granularity="tensor", n_directions=k)
    for name in truth[0]:
        sigmas = [float(t[name].norm()) for t in truth]
        mean = math.sqrt(2 / math.pi) * sum(sigmas)
        std = math.sqrt((1 - 2 / math.pi) / k * sum(s * s for s in sigmas))
        assert abs(result.layer_scores[name] - mean) <= 4 * std, (name, result.layer_scores[name], mean, std)
    assert result.forward_passes == 2 * k * len(truth[0]) * len(batches)


def test_zeroth_order_group_estimate_matches_first_order_group_norms():
    """Group granularity: d_gbk = g_gb . z ~ N(0, ||g_gb||^2), so E[S_g] = sqrt(2/pi) sum_b ||g_gb||,
    sqrt(2/pi) times first-order ``l2_group``, with Var[S_g] = (1 - 2/pi) / K sum_b ||g_gb||^2 (as for
    one tensor above). 4 standard deviations allowed."""
    model = mlp().double()
    groups, batches = mlp_groups(model), mlp_batches(2, torch.float64)
    k = 300
    truth = hand_gradients(model, groups, mlp_loss, batches)
    exact = first_order(model, groups, mlp_loss, batches, norm="l2_group").group_scores
    estimate = zeroth_order(model, groups, mlp_loss, batches, granularity="group", n_directions=k).group_scores
    for group, members in groups.items():
        norms = batch_group_norms(members, truth)
        assert exact[group] == pytest.approx(sum(norms), rel=1e-9)
        std = math.sqrt((1 - 2 / math.pi) / k * sum(v * v for v in norms))
        assert abs(estimate[group] - math.sqrt(2 / math.pi) * exact[group]) <= 4 * std, group


def linear_loss_model(gradients: dict[str, torch.Tensor]) -> tuple[nn.Module, dict, LossFn]:
    """Layers whose loss is linear in their weights, L = sum_l <C_l, W_l>: the gradient is C_l exactly and
    every finite difference is exact up to rounding (float64)."""
    model = nn.ModuleDict({name: nn.Linear(c.shape[1], c.shape[0], bias=False).double()
                           for name, c in gradients.items()})

    def loss(model, batch):
        return sum((gradients[name] * layer.weight).sum() for name, layer in model.items())
    return model, {"only": dict(model.items())}, loss


def test_l1_estimate_is_the_l2_type_score_times_the_square_root_of_each_unit_size():
    model = llama(factors=(3.0, 1.0, 0.3))
    groups, batches = llama_groups(model), llama_batches()
    for granularity in ("tensor", "group"):
        raw = zeroth_order(model, groups, llama_loss, batches, granularity=granularity, n_directions=2)
        l1 = zeroth_order(model, groups, llama_loss, batches, granularity=granularity, n_directions=2,
                          l1_estimate=True)
        for group, members in groups.items():
            n_group = sum(m.weight.numel() for m in members.values())
            for name, module in members.items():
                n = module.weight.numel() if granularity == "tensor" else n_group
                assert l1.layer_scores[name] == pytest.approx(math.sqrt(n) * raw.layer_scores[name], rel=1e-12)
            assert l1.group_scores[group] == pytest.approx(sum(l1.layer_scores[n] for n in members), rel=1e-12)
    with pytest.raises(ValueError, match="l1_estimate rescales the grad variant"):
        zeroth_order(model, groups, llama_loss, batches, variant="weight_grad", l1_estimate=True)


def test_l1_estimate_follows_the_l1_norm_of_normal_gradients_across_layer_sizes():
    """L = sum_l <C_l, W_l>, so d = C_l . z exactly and one batch gives s_l = sqrt(n_l) mean_k |C_l . z_k|:
    E[s_l] = sqrt(2/pi) sqrt(n_l) ||C_l||_2 with relative std sqrt((pi - 2) / 2) / sqrt(K) (4.4% at K = 300;
    4 allowed). For C_l with standard normal entries that expectation is ||C_l||_1 to within about
    1/sqrt(n_l) (checked here to 3%), so the layers' ratio follows their sizes (64 : 1) where the raw
    L2-type scores' follows the square root (8 : 1). For entries all of one size (+-1) it is
    sqrt(2/pi) ||C_l||_1: the factor kappa of the docstring."""
    gen = torch.Generator().manual_seed(0)
    k = 300
    rel_std = math.sqrt((math.pi - 2) / 2 / k)
    normal = {"big": torch.randn(64, 128, generator=gen, dtype=torch.float64),
              "small": torch.randn(16, 8, generator=gen, dtype=torch.float64)}
    signs = {"signs": torch.randn(32, 32, generator=gen, dtype=torch.float64).sign()}
    scaled = {}
    for gradients, kappa in ((normal, 1.0), (signs, math.sqrt(2 / math.pi))):
        model, groups, loss = linear_loss_model(gradients)
        scores = zeroth_order(model, groups, loss, [{}], granularity="tensor", n_directions=k,
                              l1_estimate=True).layer_scores
        for name, c in gradients.items():
            expected = math.sqrt(2 / math.pi) * math.sqrt(c.numel()) * float(c.norm())
            assert abs(scores[name] - expected) <= 4 * rel_std * expected, (name, scores[name], expected)
            assert expected == pytest.approx(kappa * float(c.abs().sum()), rel=0.03)
        scaled.update(scores)
    model, groups, loss = linear_loss_model(normal)
    raw = zeroth_order(model, groups, loss, [{}], granularity="tensor", n_directions=k).layer_scores
    assert raw["big"] / raw["small"] == pytest.approx(8, rel=0.3)
    assert scaled["big"] / scaled["small"] == pytest.approx(64, rel=0.3)


def test_group_granularity_ranks_llama_blocks_like_the_reference():
    # layer weights scaled 3, 1, 0.3: gradient sizes well apart, in the same order for
    # the group L2 norm (group estimate) and the sum of per-tensor L2 norms (reference)
    model = llama(factors=(3.0, 1.0, 0.3))
    groups, batches = llama_groups(model), llama_batches()
    truth = hand_gradients(model, groups, llama_loss, batches)
    l2_group = group_l2(groups, truth)
    l2_sum = {g: sum(float(t[n].norm()) for t in truth for n in m) for g, m in groups.items()}
    assert ranking(l2_group) == ranking(l2_sum) == ["layer0", "layer1", "layer2"]

    group = zeroth_order(model, groups, llama_loss, batches, granularity="group", n_directions=16)
    tensor = zeroth_order(model, groups, llama_loss, batches, granularity="tensor", n_directions=4)
    tensor_summed = {g: sum(tensor.layer_scores[n] for n in m) for g, m in groups.items()}
    assert ranking(group.group_scores) == ranking(tensor_summed) == ranking(tensor.group_scores) == ranking(l2_sum)


def test_zeroth_order_weight_grad_matches_its_expectation():
    """weight_grad, tensor granularity: s_l = sum_b mean_k sum_i |W_i| |d_bk z_i|.

    With u = g.z / ||g|| ~ N(0, 1) and rho_i = g_i / ||g||, (u, z_i) is a standard
    bivariate normal with correlation rho_i, for which
    E|u| |z_i| = (2/pi) (sqrt(1 - rho_i^2) + rho_i asin(rho_i)); hence
        E[s_l] = (2/pi) sum_b ||g_b|| sum_i |W_i| (sqrt(1 - rho_bi^2) + rho_bi asin(rho_bi)),
    about (2/pi) ||W||_1 sum_b ||g_b||: the element-wise estimate d z, not the
    reference's |W| |d| (which would be sqrt(2/pi)/(2/pi) ~ 1.25 times larger).
    One draw's relative std is about that of |u|, sqrt((pi - 2)/2) ~ 0.76, plus a
    little from sum_i |W_i||z_i|; bounding it by 1, the batches' means m_b give
    std(s_l) <= sqrt(sum_b m_b^2 / K), and we allow 4 of those (about 16% here,
    so the reference-style 25% excess would fail).
    """
    model = mlp().double()
    groups, batches = mlp_groups(model), mlp_batches(2, torch.float64)
    k = 300
    truth = hand_gradients(model, groups, mlp_loss, batches)
    result = zeroth_order(model, groups, mlp_loss, batches, granularity="tensor", variant="weight_grad", n_directions=k)
    weights = {n: m.weight.detach() for members in groups.values() for n, m in members.items()}
    for name, w in weights.items():
        means = []
        for t in truth:
            norm = float(t[name].norm())
            rho = t[name] / norm
            means.append(2 / math.pi * norm * float((w.abs() * (torch.sqrt(1 - rho**2) + rho * torch.asin(rho))).sum()))
        std = math.sqrt(sum(m * m for m in means) / k)
        assert abs(result.layer_scores[name] - sum(means)) <= 4 * std, (name, result.layer_scores[name], sum(means))
    for g, members in groups.items():
        assert result.group_scores[g] == pytest.approx(sum(result.layer_scores[n] for n in members))


# ---------------------------------------------------------------- invariants and costs


SCORER_CASES = [
    ("zeroth_order", {"granularity": "group"}),
    ("zeroth_order", {"granularity": "tensor"}),
    ("zeroth_order", {"granularity": "group", "variant": "weight_grad"}),
    ("first_order", {}),
    ("first_order", {"variant": "weight_grad_sq", "checkpointing": True}),
]


@pytest.mark.parametrize("method,options", SCORER_CASES)
def test_model_state_untouched_and_seeded(method, options):
    model = llama()
    groups, batches = llama_groups(model), llama_batches()
    model.model.embed_tokens.weight.requires_grad_(False)  # a mixed set of flags to restore
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    model.train()
    model.model.layers[2].eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    stale = torch.full_like(model.lm_head.weight, 7.0)
    model.lm_head.weight.grad = stale
    rng = torch.get_rng_state()

    first = SCORERS.get(method)(model, groups, llama_loss, batches, seed=3, **options)
    again = SCORERS.get(method)(model, groups, llama_loss, batches, seed=3, **options)

    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-identical
        assert p.requires_grad == flags[n], n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.lm_head.weight.grad is stale
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(first, ScoreResult)
    assert first == again  # same seed -> identical scores
    assert set(first.group_scores) == set(groups)
    assert set(first.layer_scores) == {n for m in groups.values() for n in m}
    assert all(math.isfinite(v) and v > 0 for v in first.layer_scores.values())


def test_forward_counts_and_seed_dependence():
    model = llama()
    groups, batches = llama_groups(model), llama_batches()
    n_groups, n_tensors, n_batches = len(groups), sum(len(m) for m in groups.values()), len(batches)
    group = zeroth_order(model, groups, llama_loss, batches, granularity="group")
    tensor = zeroth_order(model, groups, llama_loss, batches, granularity="tensor")
    assert (group.forward_passes, group.backward_passes) == (2 * n_groups * n_batches, 0)  # 12
    assert (tensor.forward_passes, tensor.backward_passes) == (2 * n_tensors * n_batches, 0)  # 84
    three = zeroth_order(model, groups, llama_loss, batches, granularity="group", n_directions=3)
    assert three.forward_passes == 3 * group.forward_passes
    other_seed = zeroth_order(model, groups, llama_loss, batches, granularity="group", seed=1)
    assert other_seed.group_scores != group.group_scores
    # grad variant at group granularity: layer scores split S_g by weight count and add up to it
    for g, members in groups.items():
        assert sum(group.layer_scores[n] for n in members) == pytest.approx(group.group_scores[g])


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("method", ["zeroth_order", "first_order"])
def test_unknown_variant_lists_the_known_ones(method):
    model = mlp()
    with pytest.raises(ValueError) as info:
        SCORERS.get(method)(model, mlp_groups(model), mlp_loss, mlp_batches(1), variant="hessian")
    assert all(v in str(info.value) for v in VARIANTS)
    assert VARIANTS == ("grad", "weight_grad", "weight_grad_sq")


def test_bad_arguments():
    model = mlp()
    groups, batches = mlp_groups(model), mlp_batches(1)
    with pytest.raises(ValueError, match="granularity"):
        zeroth_order(model, groups, mlp_loss, batches, granularity="row")
    with pytest.raises(ValueError, match="norm"):
        first_order(model, groups, mlp_loss, batches, norm="l3")
    with pytest.raises(ValueError, match="n_directions"):
        zeroth_order(model, groups, mlp_loss, batches, n_directions=0)
    with pytest.raises(ValueError, match="batches"):
        first_order(model, groups, mlp_loss, [])
    twice = {"a": {"0.fc1": model[0].fc1}, "b": {"0.fc1": model[0].fc1}}
    with pytest.raises(ValueError, match="listed in groups"):
        zeroth_order(model, twice, mlp_loss, batches)
    shared = {"a": {"x": model[0].fc1, "y": model[0].fc1}}
    with pytest.raises(ValueError, match="share one weight"):
        first_order(model, shared, mlp_loss, batches)
    foreign = {"a": {"x": nn.Linear(8, 8)}}
    with pytest.raises(ValueError, match="not a parameter"):
        zeroth_order(model, foreign, mlp_loss, batches)


def test_checkpointing_without_support_warns_and_scores(capsys):
    model = mlp()
    groups, batches = mlp_groups(model), mlp_batches(1)
    with pytest.warns(UserWarning, match="checkpointing=True ignored"):
        result = first_order(model, groups, mlp_loss, batches, checkpointing=True, progress=True)
    assert result == first_order(model, groups, mlp_loss, batches)
    assert result.forward_passes == 1
    zeroth_order(model, groups, mlp_loss, batches, progress=True)
    assert "scores" in capsys.readouterr().err  # the tqdm bars


def test_registry_and_no_orchestration_imports():
    import subprocess
    import sys

    assert {"zeroth_order", "first_order"} <= set(SCORERS.names())
    code = (
        "import sys, vlmprune.scorers; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'dvc')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- forwards from the perturbed block


def llama_blocks(model):
    return {f"layer{i}": layer for i, layer in enumerate(model.model.layers)}


@pytest.mark.parametrize("granularity", ["group", "tensor"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_blocks_give_the_same_scores_with_fewer_block_calls(granularity, variant):
    model = llama(factors=(3.0, 1.0, 0.3))
    groups, batches, blocks = llama_groups(model), llama_batches(), llama_blocks(model)
    calls = {name: 0 for name in blocks}
    for name, block in blocks.items():  # count real work: a skipped block never calls its MLP
        block.mlp.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
    full = zeroth_order(model, groups, llama_loss, batches, variant=variant, granularity=granularity)
    full_calls = dict(calls)
    calls.update({name: 0 for name in calls})
    cached = zeroth_order(model, groups, llama_loss, batches, variant=variant, granularity=granularity, blocks=blocks)
    for name, value in full.layer_scores.items():
        assert cached.layer_scores[name] == pytest.approx(value, rel=1e-4, abs=1e-9)
    # full: every block runs in every forward. Cached: per batch one clean forward (+ one check on the
    # first batch), and a perturbation of layer k runs layers k..2 only. The clean input of layer k
    # (output of layer k - 1) is computed again before layer k is perturbed: layers 0 and 1 once per
    # batch; on the first batch the check from layer 2 computes both first, and layer 0's output,
    # dropped there (only layer 1 reads it), is computed a third time for layer 1.
    units = {"group": 1, "tensor": 7}[granularity]
    assert full_calls == {name: 3 * 2 * units * 2 for name in blocks}
    recomputed = {0: 3, 1: 2, 2: 0}
    assert calls == {f"layer{k}": 2 * (1 + 2 * units * (k + 1)) + (k == 2) + recomputed[k] for k in range(3)}
    assert cached.forward_passes == full.forward_passes + 2 + 1


def test_cached_scoring_reseeds_its_check_and_refuses_dropout():
    # randomness outside the blocks (noise the loss draws): the check from the last block re-seeds like
    # the clean forward, so it passes, with the uncached scores; dropout inside the blocks cannot pass,
    # since the skipped blocks draw no random numbers, and the error says so
    def noisy_loss(model, batch):
        return llama_loss(model, batch) + 0.01 * torch.randn(())

    model = llama()
    groups, batches, blocks = llama_groups(model), llama_batches(), llama_blocks(model)
    for names in (["layer2"], list(blocks)):  # layer2 alone: no block output to compute again before the check
        chosen = {name: groups[name] for name in names}
        cached = zeroth_order(model, chosen, noisy_loss, batches, blocks={name: blocks[name] for name in names})
        full = zeroth_order(model, chosen, noisy_loss, batches)
        assert cached.group_scores == pytest.approx(full.group_scores, rel=1e-4)
    model.train()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    with pytest.raises(RuntimeError, match="cache_inputs: false .*dropout in train mode"):
        zeroth_order(model, groups, llama_loss, batches, blocks=blocks, eval_mode=False)


def test_block_cache_holds_one_hidden_state_per_chain_and_reproduces_the_clean_loss_from_every_block():
    model = llama(factors=(3.0, 1.0, 0.3))
    blocks, batch = llama_blocks(model), llama_batches(1)[0]
    cache = BlockCache(blocks, {"lm": list(blocks)})
    with torch.no_grad():
        clean = cache.capture(lambda: llama_loss(model, batch))
        assert cache.held() == 0  # the last block's output feeds only the head, which always runs
        for name in blocks:
            with cache.start_at(name):
                assert cache.held() == (name != "layer0")  # the output of the block before, nothing else
                assert float(llama_loss(model, batch)) == pytest.approx(clean, rel=1e-6)


def test_forward_difference_approaches_the_central_one():
    model = llama(factors=(3.0, 1.0, 0.3))
    groups, batches, blocks = llama_groups(model), llama_batches(), llama_blocks(model)
    central = zeroth_order(model, groups, llama_loss, batches, blocks=blocks, n_directions=4)
    forward = zeroth_order(model, groups, llama_loss, batches, blocks=blocks, n_directions=4, difference="forward")
    # same directions; the forward difference adds eps z^T H z / 2, tiny at eps = 1e-3
    for name, value in central.group_scores.items():
        assert forward.group_scores[name] == pytest.approx(value, rel=0.02)
    assert forward.forward_passes == 4 * 3 * 2 + 2 + 1
    with pytest.raises(ValueError, match="pass blocks"):
        zeroth_order(model, groups, llama_loss, batches, difference="forward")
    with pytest.raises(ValueError, match="central, forward"):
        zeroth_order(model, groups, llama_loss, batches, blocks=blocks, difference="backward")


def test_cached_blocks_across_two_towers_and_broken_chains():
    """Two towers run one after the other (a dual-encoder shape): skipping the first tower's blocks
    must hand the second tower the first tower's real output."""

    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Sequential(*[Block(8, 16) for _ in range(3)])
            self.b = nn.Sequential(*[Block(8, 16) for _ in range(2)])

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = TwoTowers()
    groups = {f"a{i}": {f"a.{i}.fc1": m.fc1, f"a.{i}.fc2": m.fc2} for i, m in enumerate(model.a)}
    groups |= {f"b{i}": {f"b.{i}.fc1": m.fc1, f"b.{i}.fc2": m.fc2} for i, m in enumerate(model.b)}
    blocks = {f"a{i}": m for i, m in enumerate(model.a)} | {f"b{i}": m for i, m in enumerate(model.b)}
    towers = {"a": ["a0", "a1", "a2"], "b": ["b0", "b1"]}
    batches = mlp_batches()
    full = zeroth_order(model, groups, mlp_loss, batches, variant="weight_grad")
    cached = zeroth_order(model, groups, mlp_loss, batches, variant="weight_grad", blocks=blocks, towers=towers)
    for name, value in full.layer_scores.items():
        assert cached.layer_scores[name] == pytest.approx(value, rel=1e-4)
    # the first tower's last output stays held for the second tower, and the second tower's own last
    # output, in case it can be answered from the clean forward, beside one state per chain
    cache = BlockCache(blocks, towers)
    with torch.no_grad():
        clean = cache.capture(lambda: mlp_loss(model, batches[0]))
        for name, held in {"a0": 2, "a1": 3, "a2": 3, "b0": 2, "b1": 3}.items():
            with cache.start_at(name):
                assert cache.held() == held
                assert float(mlp_loss(model, batches[0])) == pytest.approx(clean, rel=1e-6)
    # declaring the blocks as one chain in the wrong order is caught at capture
    with pytest.raises(RuntimeError, match="is not the output of"):
        zeroth_order(model, groups, mlp_loss, batches, blocks=blocks, towers={"x": ["a0", "a2", "a1", "b0", "b1"]})
    # code after the first tower that writes into its output would corrupt the held copy: refused
    model.forward = lambda x: model.b(torch.tanh_(model.a(x)))
    with pytest.raises(RuntimeError, match="modified the recorded output of 'a2' in place"):
        zeroth_order(model, groups, mlp_loss, batches, blocks=blocks, towers=towers)


class ContextBlock(Block):
    """A residual block that may also read a side input (a cross-attention-like ``context`` keyword)."""

    def forward(self, x, context=None, cache=None):
        return super().forward(x if context is None else x + context)


class KeyValueCache:
    """Stands for an object a block is passed but the block cache cannot compare (a KV cache)."""


class SideTowers(nn.Module):
    """Tower a, then tower b. ``mode`` says how b depends on a: "none" (b reads the batch only, a
    dual encoder), "context" (b's hidden input is a fixed query, every b block reads a's output as a
    side input, a Q-Former), "late" (only b's second block reads it), "opaque" (b reads the batch only
    but each forward passes its blocks a new object, like a key-value cache)."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.a = nn.ModuleList([Block(8, 16) for _ in range(3)])
        self.b = nn.ModuleList([ContextBlock(8, 16) for _ in range(2)])
        self.query = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = x
        for block in self.a:
            h = block(h)
        g = x.flip(-1) if self.mode in ("none", "opaque") else self.query.expand_as(x)
        cache = KeyValueCache() if self.mode == "opaque" else None
        self.last_cache = weakref.ref(cache) if cache is not None else None
        for i, block in enumerate(self.b):
            reads = self.mode == "context" or (self.mode == "late" and i == 1)
            g = block(g, context=torch.tanh(h) if reads else None, cache=cache)
        return h * g


def side_towers(mode):
    model = SideTowers(mode)
    groups = {f"a{i}": {f"a.{i}.fc1": m.fc1, f"a.{i}.fc2": m.fc2} for i, m in enumerate(model.a)}
    groups |= {f"b{i}": {f"b.{i}.fc1": m.fc1, f"b.{i}.fc2": m.fc2} for i, m in enumerate(model.b)}
    blocks = {f"a{i}": m for i, m in enumerate(model.a)} | {f"b{i}": m for i, m in enumerate(model.b)}
    return model, groups, blocks, {"a": ["a0", "a1", "a2"], "b": ["b0", "b1"]}


@pytest.mark.parametrize("mode", ["none", "context", "opaque"])
def test_later_tower_answered_from_the_clean_forward_only_when_its_inputs_are_clean(mode):
    model, groups, blocks, towers = side_towers(mode)
    batches = mlp_batches()
    clean_a = [p.detach().clone() for p in model.a.parameters()]
    b_runs = {"a perturbed": 0, "a clean": 0}

    def count(module, args, kwargs):  # real work in tower b, and whether tower a is perturbed meanwhile
        perturbed = any(not torch.equal(p, c) for p, c in zip(model.a.parameters(), clean_a))
        b_runs["a perturbed" if perturbed else "a clean"] += 1

    for block in model.b:
        block.fc1.register_forward_pre_hook(count, with_kwargs=True)
    full = zeroth_order(model, groups, mlp_loss, batches)
    assert b_runs["a perturbed"] == 3 * 2 * len(batches) * 2  # every perturbation of a runs both b blocks
    b_runs.update({"a perturbed": 0, "a clean": 0})
    cached = zeroth_order(model, groups, mlp_loss, batches, blocks=blocks, towers=towers)
    for name, value in full.layer_scores.items():
        assert cached.layer_scores[name] == pytest.approx(value, rel=1e-4)
    # independent b: answered from the clean forward whenever a is perturbed; b reading a (a side
    # input that differs, its hidden input the same fixed query), or passed an object the cache cannot
    # compare: b runs for real every time
    assert b_runs["a perturbed"] == (0 if mode == "none" else 3 * 2 * len(batches) * 2)
    assert b_runs["a clean"] > 0  # b's own perturbations still run it
    if mode == "opaque":  # the recorded inputs hold no reference to the object (a KV cache stays freed)
        cache = BlockCache(blocks, towers)
        with torch.no_grad():
            cache.capture(lambda: mlp_loss(model, batches[0]))
        assert model.last_cache() is None


def test_later_tower_reading_the_perturbed_one_only_from_its_second_block_runs_for_real():
    # b0 sees clean inputs, b1 a changed side input: the answer from the clean forward is abandoned at
    # b1 and the forward runs again with tower b for real, so the scores are those of full forwards
    model, groups, blocks, towers = side_towers("late")
    full = zeroth_order(model, groups, mlp_loss, mlp_batches())
    cached = zeroth_order(model, groups, mlp_loss, mlp_batches(), blocks=blocks, towers=towers)
    for name, value in full.layer_scores.items():
        assert cached.layer_scores[name] == pytest.approx(value, rel=1e-4)
    cache, batch = BlockCache(blocks, towers), mlp_batches()[0]
    with torch.no_grad():
        clean = cache.capture(lambda: mlp_loss(model, batch))
        model.a[0].fc1.weight.add_(1.0)
        expected = float(mlp_loss(model, batch))
        with cache.start_at("a0"):
            assert float(cache.run(lambda: mlp_loss(model, batch))) == pytest.approx(expected, rel=1e-6)
        model.a[0].fc1.weight.sub_(1.0)
    assert cache.run_for_real == {"b"} and expected != pytest.approx(clean)


def test_two_later_towers_reading_the_perturbed_one_late_each_run_for_real():
    # towers b and c both look clean at their first block and read a only at their second: one forward
    # is dropped per tower, each found in turn, and the scores are those of full forwards
    model, groups, blocks, towers = side_towers("late")
    model.c = nn.ModuleList([ContextBlock(8, 16) for _ in range(2)])
    def forward(x):
        h = x
        for block in model.a:
            h = block(h)
        g, k = model.query.expand_as(x), x.flip(0)
        g = model.b[1](model.b[0](g), context=torch.tanh(h))
        k = model.c[1](model.c[0](k), context=torch.tanh(h))
        return h * g + k

    model.forward = forward
    groups |= {f"c{i}": {f"c.{i}.fc1": m.fc1, f"c.{i}.fc2": m.fc2} for i, m in enumerate(model.c)}
    blocks |= {f"c{i}": m for i, m in enumerate(model.c)}
    towers = {**towers, "c": ["c0", "c1"]}
    full = zeroth_order(model, groups, mlp_loss, mlp_batches())
    cached = zeroth_order(model, groups, mlp_loss, mlp_batches(), blocks=blocks, towers=towers)
    for name, value in full.layer_scores.items():
        assert cached.layer_scores[name] == pytest.approx(value, rel=1e-4)
    cache, weight = BlockCache(blocks, towers), model.a[0].fc1.weight
    with torch.no_grad():
        cache.capture(lambda: mlp_loss(model, mlp_batches()[0]))
        with cache.start_at("a0"):
            weight.add_(1.0)
            cache.run(lambda: mlp_loss(model, mlp_batches()[0]))
    assert cache.run_for_real == {"b", "c"}


# ---------------------------------------------------------------- linearised loss head


@pytest.mark.parametrize("granularity", ["group", "tensor"])
def test_linear_head_estimates_the_directional_derivatives_at_least_as_well_as_the_loss(granularity):
    """Central differences of the head's input, weighted by G = dL/dh0, against those of the loss: both
    estimate g . z; the linearised one drops only the head's curvature (order eps^2 here) and float32's
    rounding of the loss (about 1e-7 of a loss near 4, which a difference over 2 eps = 2e-3 magnifies to
    1e-4: larger than some of these tensors' g . z, so the exact loss misses them entirely)."""
    model = llama(factors=(3.0, 1.0, 0.3))
    groups, batches, blocks = llama_groups(model), llama_batches(), llama_blocks(model)
    truth = directional_derivative_sums(model, groups, llama_loss, batches, granularity)
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(1))  # completed calls
    runs = {}
    for head in (None, model.lm_head):
        calls.clear()
        result = zeroth_order(model, groups, llama_loss, batches, blocks=blocks, granularity=granularity, head=head)
        scores = result.group_scores if granularity == "group" else result.layer_scores
        runs[head is not None] = (max(abs(scores[u] / t - 1) for u, t in truth.items()), len(calls))
    (exact_error, exact_calls), (linear_error, linear_calls) = runs[False], runs[True]
    assert linear_error <= exact_error
    assert linear_error < {"group": 5e-3, "tensor": 0.05}[granularity]
    assert linear_calls == 2 + 1  # one clean forward per batch and the cache's check: no perturbed forward
    assert exact_calls == result.forward_passes


def test_linear_head_refusals():
    model = llama()
    groups, batches, blocks = llama_groups(model), llama_batches(1), llama_blocks(model)
    with pytest.raises(ValueError, match="head .* pass blocks"):
        zeroth_order(model, groups, llama_loss, batches, head=model.lm_head)

    def head_twice(model, batch):
        hidden = model.model(**batch).last_hidden_state
        return model.lm_head(hidden).logsumexp(-1).mean() + model.lm_head(hidden).mean()

    with pytest.raises(RuntimeError, match="the loss head ran 2 times in one forward"):
        zeroth_order(model, groups, head_twice, batches, blocks=blocks, head=model.lm_head)
    with pytest.raises(RuntimeError, match="never called the loss head"):
        zeroth_order(model, groups, llama_loss, batches, blocks=blocks, head=nn.Linear(2, 2))
