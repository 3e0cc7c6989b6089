"""Block-by-block pruning equals what the pruned model really computes, and touches only its blocks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlmprune.pruners import PRUNERS
from vlmprune.sequential import capture_group_inputs, prune_tower_sequential
from vlmprune.sparsity import layer_sparsities, model_layout, sparsity_report
from vlmprune.adapters.base import Tower


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def batches(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(n)]


def tower(model):
    return Tower("language", [(f"model.layers.{i}", l) for i, l in enumerate(model.model.layers)],
                 lambda m, b: m(**b, use_cache=False))


def run_prune(model, data, pruner, sparsity=0.5, nm=None):
    t = tower(model)
    groups = model_layout(model, [t])
    members = [(g.name, g.module, g.layers) for g in groups]
    masks = prune_tower_sequential(model, t.run, data, members, layer_sparsities(groups, {g.name: sparsity for g in groups}),
                                   pruner, nm, progress=False)
    return groups, masks


def test_captured_inputs_equal_the_pruned_models_real_forward():
    model, data = tiny_llama(), batches()
    recorded = {}

    class Recorder(PRUNERS.get("wanda")):
        def prune(self, weight, stats, sparsity, nm):
            recorded.setdefault("order", []).append(stats.col_sq_norm.clone())
            return super().prune(weight, stats, sparsity, nm)

    groups, _ = run_prune(model, data, Recorder())
    # q_proj is the first layer of every block: its input depends only on the blocks before it,
    # all of them pruned by now. Compare with a real forward of the final pruned model.
    layer_names = [n for g in groups for n in g.layers]
    real = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("self_attn.q_proj"):
            def hook(mod, inp, out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                real[name] = real.get(name, 0) + (x * x).sum(0)
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for b in data:
            model(**b, use_cache=False)
    for h in hooks:
        h.remove()
    for index, name in enumerate(layer_names):
        if name.endswith("q_proj"):
            torch.testing.assert_close(recorded["order"][index], real[name], rtol=1e-5, atol=1e-6)


def test_group_inputs_are_captured_once_per_batch_and_group():
    model, data = tiny_llama(), batches()
    t = tower(model)
    hidden, calls = capture_group_inputs(model, t.run, data, [g for _, g in t.groups])
    assert len(hidden) == len(data) and all(len(c) == 3 for c in calls)
    assert hidden[0].shape == (4, 12, 32)
    # the embedding output is what the first block receives
    torch.testing.assert_close(hidden[0], model.model.embed_tokens(data[0]["input_ids"]))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_same_data_same_masks_bit_for_bit(method):
    masks = []
    for _ in range(2):
        model = tiny_llama()
        _, m = run_prune(model, batches(), PRUNERS.get(method)())
        masks.append(m)
    assert masks[0].keys() == masks[1].keys()
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_only_prunable_layers_change_and_report_counts_zeros():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups, masks = run_prune(model, batches(), PRUNERS.get("wanda")(), nm=(2, 4))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.weight" for name in masks}  # embeddings, norms, lm_head untouched
    report = sparsity_report(groups)
    assert report["overall"] == pytest.approx(0.5) and report["towers"] == {"language": pytest.approx(0.5)}


def test_library_imports_no_orchestration_tools():
    code = ("import pkgutil, importlib, sys, vlmprune\n"
            "for m in pkgutil.walk_packages(vlmprune.__path__, 'vlmprune.'): importlib.import_module(m.name)\n"
            "bad = [n for n in ('prefect', 'mlflow', 'dvc') if n in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
