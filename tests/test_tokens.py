"""PAR token and layer pruning (vlmprune/par/) on a tiny LLaVA built from a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_llava, save_tiny
from vlmprune.par.decoder import decoder_of
from vlmprune.par.engine import Plan, decode, generate, keep_count, prefill, run_layer_weighted, run_prefix
from vlmprune.par.policies import AttentionPolicy, RandomPolicy, RouterPolicy, block_influence, top_mask
from vlmprune.par.router import MetaRouter, RouterConfig, load_router, save_router
from vlmprune.par.train import make_examples, router_loss, train_router

N_VISUAL = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llava():
    model, tokenizer = build_tiny_llava(text_layers=4)
    return model, tokenizer, decoder_of(model)


def prompt(model, batch: int = 2, seed: int = 0, visual_first: bool = False):
    """LLaVA layout (text, image, text), or the VisionLM layout (image tokens first, then text)."""
    image = model.config.image_token_index
    row = [image] * N_VISUAL + [2000, 2001, 2003, 2004, 2005] if visual_first else \
        [101, 2000, 2001] + [image] * N_VISUAL + [2003, 2004, 2005]
    ids = torch.tensor([row]).expand(batch, -1)
    return ids, torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def router_for(dec, k=1, seed=0):
    torch.manual_seed(seed)
    return MetaRouter(RouterConfig(dec.hidden_size, dec.n_layers, k, width=16)).eval()


def test_keep_count_is_floor_of_n_times_r():
    cases = {(16, 0.5): 8, (16, 0.25): 4, (49, 0.5): 24, (49, 0.25): 12, (30, 0.75): 22, (10, 0.7): 7,
             (100, 0.29): 29, (3, 1.0): 3, (3, 0.3): 0}
    for (n, r), expected in cases.items():
        assert keep_count(n, r) == expected, (n, r)
    with pytest.raises(ValueError, match="not in"):
        keep_count(4, 1.5)


@pytest.mark.parametrize("policy", [None, "router", "attention", "random"])
def test_full_keep_gives_the_dense_model_outputs(llava, policy):
    model, _, dec = llava
    ids, pixels = prompt(model)
    policies = {None: None, "router": RouterPolicy(router_for(dec)), "attention": AttentionPolicy([0.1] * 4),
                "random": RandomPolicy(0)}
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels).logits[:, -1]
        logits, cache = prefill(dec, dec.embed_inputs(ids, pixels), dec.visual_mask(ids), Plan(1.0, 1.0, 1),
                                policies[policy])
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
    assert cache.kept_tokens == ids.shape[1] and bool(cache.layer_keep.all())
    expected = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                              max_new_tokens=5, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(generate(dec, ids, pixels, Plan(1.0, 1.0, 1), policies[policy], max_new_tokens=5), expected)


@pytest.mark.parametrize("ratio", [1.0, 0.75, 0.5, 0.3, 0.25, 0.0])
def test_token_ratio_keeps_floor_n_r_visual_tokens(llava, ratio):
    model, _, dec = llava
    ids, pixels = prompt(model)
    k = 2
    _, cache = prefill(dec, dec.embed_inputs(ids, pixels), dec.visual_mask(ids), Plan(ratio, 1.0, k),
                       RandomPolicy(1))
    n_text = ids.shape[1] - N_VISUAL
    lengths = [kv[0].shape[2] for kv in cache.kv]
    assert lengths == [ids.shape[1]] * k + [n_text + keep_count(N_VISUAL, ratio)] * (dec.n_layers - k)


def test_skipped_layers_are_never_called(llava):
    model, _, dec = llava
    calls = {i: 0 for i in range(dec.n_layers)}
    handles = [module.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(dec.layers) for module in layer.modules()]
    try:
        for seed in range(3):
            for value in calls:
                calls[value] = 0
            ids, pixels = prompt(model, batch=1, seed=seed)
            logits, cache = prefill(dec, dec.embed_inputs(ids, pixels), dec.visual_mask(ids), Plan(0.5, 0.5, 1),
                                    RandomPolicy(seed))
            for _ in range(3):
                logits = decode(dec, logits.argmax(-1), cache)
            keep = cache.layer_keep[0].tolist()
            assert sum(keep) == keep_count(dec.n_layers, 0.5) and keep[0]
            for i in range(dec.n_layers):
                assert (calls[i] > 0) == keep[i], (i, keep, calls)
                assert (cache.kv[i] is None) == (not keep[i])
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("visual_first", [False, True])
def test_token_dropping_equals_masking_the_dropped_keys(llava, visual_first):
    """The compact pruned pass and the full-length pass with 0/1 key weights (what the router is
    trained through) give the same last-position logits."""
    model, _, dec = llava
    ids, pixels = prompt(model, visual_first=visual_first)
    k, plan, policy = 1, Plan(0.25, 1.0, 1), RouterPolicy(router_for(dec))
    embeds, mask = dec.embed_inputs(ids, pixels), dec.visual_mask(ids)
    with torch.no_grad():
        logits, _ = prefill(dec, embeds, mask, plan, policy)
        prefix = run_prefix(dec, embeds, mask, k)
        kept = top_mask(policy.token_scores(prefix), keep_count(N_VISUAL, 0.25))
        weight = torch.ones(mask.shape).masked_scatter(mask, kept.float().reshape(-1))
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        cos, sin = dec.rotary(embeds, positions)
        h = prefix.hidden
        for index in range(k, dec.n_layers):
            h = run_layer_weighted(dec, dec.layers[index], h, cos, sin, weight)
        masked = dec.lm_head(dec.norm(h[:, -1]))
    torch.testing.assert_close(logits, masked, rtol=0, atol=1e-5)


def test_attention_scores_are_the_last_tokens_attention_in_layer_k_minus_1(llava):
    model, _, dec = llava
    ids, pixels = prompt(model)
    k = 2
    eager, _ = build_tiny_llava(text_layers=4)
    eager.config.text_config._attn_implementation = "eager"
    eager.model.language_model.config._attn_implementation = "eager"
    with torch.no_grad():
        out = eager(input_ids=ids, pixel_values=pixels, output_attentions=True)
        prefix = run_prefix(dec, dec.embed_inputs(ids, pixels), dec.visual_mask(ids), k, want_attention=True)
    expected = out.attentions[k - 1][:, :, -1].mean(1)[dec.visual_mask(ids)].view(2, -1)
    torch.testing.assert_close(AttentionPolicy().token_scores(prefix), expected, rtol=0, atol=1e-6)


def test_block_influence_ranks_layers_for_the_attention_policy(llava):
    model, _, dec = llava
    ids, pixels = prompt(model)
    influence = block_influence(dec, [dec.embed_inputs(ids, pixels)])
    assert len(influence) == dec.n_layers and all(0 <= b <= 2 for b in influence)
    _, cache = prefill(dec, dec.embed_inputs(ids, pixels), dec.visual_mask(ids), Plan(1.0, 0.5, 1),
                       AttentionPolicy([0.0, 0.3, 0.1, 0.2]))
    assert cache.layer_keep.tolist() == [[True, True, False, False]] * 2  # layer 1 has the largest influence


def test_plan_errors_name_the_problem(llava):
    model, _, dec = llava
    ids, pixels = prompt(model)
    embeds, mask = dec.embed_inputs(ids, pixels), dec.visual_mask(ids)
    with pytest.raises(ValueError, match="fewer than the 3 layers before the router"):
        prefill(dec, embeds, mask, Plan(1.0, 0.5, 3), RandomPolicy())
    with pytest.raises(ValueError, match="no policy"):
        prefill(dec, embeds, mask, Plan(0.5, 1.0, 1))
    with pytest.raises(ValueError, match="par.k"):
        prefill(dec, embeds, mask, Plan(1.0, 1.0, 4))


def test_random_policy_is_seeded(llava):
    model, _, dec = llava
    ids, pixels = prompt(model)
    runs = [generate(dec, ids, pixels, Plan(0.25, 0.5, 1), RandomPolicy(seed), max_new_tokens=3)
            for seed in (5, 5)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("visual_first", [False, True])
def test_router_loss_falls(llava, visual_first):
    model, _, dec = llava
    ids, pixels = prompt(model, batch=24, visual_first=visual_first)
    examples = make_examples(dec, ids[:1], pixels, k=1, max_new_tokens=2, batch_size=12)
    router = router_for(dec)
    plan = Plan(0.25, 0.5, 1)
    with torch.no_grad():
        before = float(router_loss(dec, router, examples, plan))
    losses = train_router(dec, router, examples, steps=15, lr=1e-2, batch_size=8, points=[(0.25, 0.5)])
    with torch.no_grad():
        after = float(router_loss(dec, router, examples, plan))
    assert len(losses) == 15 and before > 0
    assert after < 0.9 * before, (before, after)
    assert not any(p.grad is not None for p in model.parameters())


def test_router_saves_and_loads(llava, tmp_path):
    model, _, dec = llava
    ids, _ = prompt(model)
    router = router_for(dec, seed=3)
    save_router(router, tmp_path, note="test")
    loaded = load_router(tmp_path)
    h = torch.randn(2, ids.shape[1], dec.hidden_size)
    mask = dec.visual_mask(ids)
    assert torch.equal(loaded.token_scores(h, mask), router.token_scores(h, mask))
    assert torch.equal(loaded.layer_logits(h), router.layer_logits(h))
    assert json.loads((tmp_path / "router.json").read_text())["note"] == "test"
    with pytest.raises(FileNotFoundError, match="train_router"):
        load_router(tmp_path / "missing")


def _params(model_dir, artifacts, **par):
    from params.schema import validate

    return validate({
        "artifacts": str(artifacts), "model": {"id": str(model_dir)}, "data": {"name": "digits"},
        "scoring": {"method": "none", "n_samples": 4}, "allocation": {"method": "uniform"},
        "calibration": {"n_samples": 4}, "evaluation": {"batch_size": 16},
        "tracking": {"enabled": False},
        "par": {"enabled": True, "k": 1, "token_ratios": [1.0, 0.5], "layer_ratios": [1.0, 0.5], "router_width": 8,
                "steps": 2, "batch_size": 4, "train_samples": 4, "eval_samples": 4, "latency_repeats": 1, **par},
    })


def test_stages_skip_when_disabled_and_run_on_tiny_llava(tmp_path):
    from tasks.router import evaluate_tokens, train_router as train_stage

    model, tokenizer = build_tiny_llava(text_layers=4)
    model_dir = save_tiny(model, tokenizer, tmp_path / "model")
    off = _params(model_dir, tmp_path / "off", enabled=False)
    for stage in (train_stage, evaluate_tokens):
        meta = json.loads((Path(stage.fn(off)) / "meta.json").read_text())
        assert meta["skipped"] == "par.enabled is false"

    params = _params(model_dir, tmp_path / "on")
    router_dir = tmp_path / "on" / "train_router"
    train_stage.fn(params)
    assert (router_dir / "router.safetensors").exists()
    assert len(json.loads((router_dir / "router.json").read_text())["block_influence"]) == 4
    evaluate_tokens.fn(params)
    metrics = json.loads((tmp_path / "on" / "evaluate_tokens" / "metrics.json").read_text())
    rows = metrics["rows"]
    assert len(rows) == 1 + 3 * 3  # dense + 3 policies x 3 pruned operating points
    assert {r["method"] for r in rows} == {"dense", "router", "attention", "random"}
    assert all(0 <= r["accuracy"] <= 1 and r["prefill_ms"] > 0 and r["decode_ms"] > 0 for r in rows)
    assert (tmp_path / "on" / "evaluate_tokens" / "accuracy_latency.png").read_bytes()[:4] == b"\x89PNG"
