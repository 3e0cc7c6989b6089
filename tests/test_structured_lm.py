"""Structured pruning of causal LMs (MoPE with the LM loss, magnitude, layer drop) on a tiny LLaMA with
grouped-query attention (4 query heads, 2 KV heads, head_dim 8, FFN 64, 2 layers): surgery against
masked dense forwards, hand-computed magnitude norms, MoPE's cached batched scores against plain
removal, save/load through the causal_lm adapter, and the prune stage end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tests.tiny import build_tiny_causal_lm, save_tiny, tiny_params
from vlmprune.adapters.causal_lm import CausalLMAdapter, lm_loss
from vlmprune.structured import StructuredSettings, count_parameters, current_structure, structured_prune
from vlmprune.structured.magnitude import MagnitudeScorer
from vlmprune.structured.mope import contiguous_groups
from vlmprune.structured.mope_lm import LMMoPEScorer
from vlmprune.structured.persist import record_structure
from vlmprune.structured.surgery import keep_heads, keep_layers, keep_width
from vlmprune.structured.towers import structured_towers

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llama():
    model, tokenizer = build_tiny_causal_lm("llama")
    torch.manual_seed(1)
    ids = torch.randint(1000, 5000, (4, 20))
    return model, tokenizer, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def loss(model, batch):
    return float(lm_loss(logits(model, batch), batch["input_ids"]))


def tower(model):
    return structured_towers(model)[0]


# ---- surgery ---------------------------------------------------------------------------------------

def test_gqa_head_units_span_a_kv_head_and_its_query_heads(llama):
    model, _, _ = llama
    a = tower(model).attention(tower(model).layers[0])
    assert (a.head_dim, a.group, a.n_heads) == (8, 2, 2)  # 4 query heads over 2 KV heads: 2 units
    assert a.query_index([1]) == list(range(16, 32)) and a.kv_index([1]) == list(range(8, 16))


def test_removing_a_head_unit_equals_zeroing_its_query_heads(llama):
    """Unit 1 = KV head 1 with query heads 2 and 3; o(concat heads) is a sum over heads of W_o[:, h] ctx_h,
    so zeroing W_o's columns 16:32 removes exactly what physical removal removes."""
    model, _, batch = llama
    zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[1].self_attn.o_proj.weight[:, 16:32] = 0
    keep_heads(tower(pruned).attention(tower(pruned).layers[1]), [0])
    attn = pruned.model.layers[1].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features, attn.o_proj.in_features) \
        == (16, 8, 8, 16)
    assert attn.num_key_value_groups == 2  # still uniform
    torch.testing.assert_close(logits(pruned, batch), logits(zeroed, batch), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits(pruned, batch), logits(model, batch), atol=1e-4)
    assert count_parameters(model) - count_parameters(pruned) == 32 * (8 + 8 + 16 + 16)


def test_removing_ffn_neurons_equals_zeroing_their_down_columns(llama):
    """down(act(gate x) * up x) is a sum over neurons of W_down[:, i] * act(gate_i x) * up_i x."""
    model, _, batch = llama
    drop = [0, 7, 40, 63]
    zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[0].mlp.down_proj.weight[:, drop] = 0
    w = tower(pruned).width(tower(pruned).layers[0])
    keep_width(w, [i for i in range(64) if i not in drop])
    mlp = pruned.model.layers[0].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (60, 60, 60)
    torch.testing.assert_close(logits(pruned, batch), logits(zeroed, batch), atol=1e-5, rtol=1e-4)
    assert count_parameters(model) - count_parameters(pruned) == 4 * 3 * 32


def test_dropping_a_decoder_layer_equals_skipping_it(llama):
    model, _, batch = llama
    skipped, pruned = copy.deepcopy(model), copy.deepcopy(model)
    skipped.model.layers[0].register_forward_hook(lambda m, args, out: args[0])
    keep_layers(tower(pruned), [1])
    assert len(pruned.model.layers) == 1 and pruned.model.layers[0].self_attn.layer_idx == 0
    torch.testing.assert_close(logits(pruned, batch), logits(skipped, batch))
    generated = pruned.generate(input_ids=batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)  # the KV cache works with the renumbered layer


def test_magnitude_norms_of_gqa_units_and_gated_ffn_by_hand(llama):
    model, _, _ = llama
    m = copy.deepcopy(model)
    layer = m.model.layers[0]
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(1.0)
        layer.self_attn.v_proj.weight[8:16] = 2.0  # unit 1's rows of v
        layer.mlp.gate_proj.weight[:16] = 3.0      # the first FFN group's gate rows
    heads = MagnitudeScorer().heads(tower(m))[0][0]
    # per unit: q rows 16x32 + o columns 32x16 + k rows 8x32 + v rows 8x32 of ones (v of unit 1: 2^2)
    assert heads[0].item() == pytest.approx((512 + 512 + 256 + 256) ** 0.5)
    assert heads[1].item() == pytest.approx((512 + 512 + 256 + 4 * 256) ** 0.5)
    groups = contiguous_groups(64, 0.25)
    width = MagnitudeScorer().width(tower(m), [groups, groups])[0][0]
    # per group of 16: up rows 16x32 + down columns 32x16 + gate rows 16x32 (group 0: 3^2)
    assert width[0].item() == pytest.approx((512 + 512 + 9 * 512) ** 0.5)
    assert width[1].item() == pytest.approx((3 * 512) ** 0.5)


# ---- MoPE with the LM loss ---------------------------------------------------------------------------

def test_mope_scores_equal_the_loss_rise_of_plain_removal(llama):
    """Cached, batched and chunked scoring (one candidate per call, LM head on one window at a time)
    against the definition: loss of the physically pruned model minus the dense loss."""
    model, _, batch = llama
    scorer = LMMoPEScorer(model, batch, max_rows=4, head_rows=1)
    t = tower(model)
    assert scorer.dense_loss == pytest.approx(loss(model, batch), rel=1e-5)
    dense = loss(model, batch)
    heads = scorer.heads(t)
    groups = [contiguous_groups(64, 0.25)] * 2
    width = scorer.width(t, groups)
    layers = scorer.layers(t)[0]
    for i in range(2):
        for u in range(2):
            m = copy.deepcopy(model)
            keep_heads(tower(m).attention(tower(m).layers[i]), [1 - u])
            assert heads[i][0][u].item() == pytest.approx(loss(m, batch) - dense, abs=2e-5)
        for g, group in enumerate(groups[i]):
            m = copy.deepcopy(model)
            keep_width(tower(m).width(tower(m).layers[i]), [n for n in range(64) if n not in group])
            assert width[i][0][g].item() == pytest.approx(loss(m, batch) - dense, abs=2e-5)
        m = copy.deepcopy(model)
        keep_layers(tower(m), [1 - i])
        assert layers[i].item() == pytest.approx(loss(m, batch) - dense, abs=2e-5)
    # refresh: 1 forward; heads 2 layers x 2 units; width 2 x 4 groups; layers 2 (one candidate per call)
    assert scorer.cost["forward_calls"] == 1 + 4 + 8 + 2
    assert scorer.cost["candidates"] == 4 + 8 + 2
    # full-forward equivalents: layer 0 candidates run 2 layers, layer 1 candidates 1; skips run one less
    assert scorer.cost["full_forward_equivalents"] == pytest.approx(1 + (2 + 4) * (1 + 0.5) + 0.5 + 0)


def test_batched_candidates_give_the_same_scores(llama):
    model, _, batch = llama
    t = tower(model)
    one = LMMoPEScorer(model, batch, max_rows=4, head_rows=1).width(t, [contiguous_groups(64, 0.125)] * 2)
    many = LMMoPEScorer(model, batch, max_rows=64, head_rows=16).width(t, [contiguous_groups(64, 0.125)] * 2)
    for a, b in zip(one, many):
        torch.testing.assert_close(a[0], b[0], atol=2e-5, rtol=1e-4)


def test_a_module_made_far_more_important_gets_the_highest_score(llama):
    """FFN group 2 of layer 1 is scaled by 30, so it dominates the residual stream, and the windows are the
    model's own greedy continuations: without that group the predictions (and the loss) fall apart."""
    model, _, _ = llama
    m = copy.deepcopy(model)
    groups = contiguous_groups(64, 0.25)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[:, groups[2]] *= 30
    torch.manual_seed(2)
    ids = torch.randint(1000, 5000, (4, 1))
    for _ in range(15):  # greedy continuations
        ids = torch.cat([ids, logits(m, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1:].argmax(-1)], 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    scorer = LMMoPEScorer(m, batch)
    width = scorer.width(tower(m), [groups, groups])
    scores = torch.cat([width[0][0], width[1][0]])
    assert int(scores.argmax()) == 4 + 2
    assert scores[6] > 10 * scores[torch.arange(8) != 6].abs().max()
    others = torch.cat([h[0] for h in scorer.heads(tower(m))])
    assert scores[6] > others.max()


@pytest.mark.parametrize("method,width,depth", [("mope", 0.5, 0.5), ("magnitude_structured", 0.5, 1.0),
                                                ("layer_drop", 1.0, 0.5)])
def test_width_then_depth_reach_the_counts(llama, method, width, depth):
    model, _, batch = llama
    m = copy.deepcopy(model)
    report = structured_prune(m, StructuredSettings(method, width_ratio=width, depth_ratio=depth, ffn_group=0.25,
                                                    metric="lm_loss"), batch)
    s = current_structure(m)["language"]
    assert len(s["layers"]) == (1 if depth < 1 else 2)
    assert set(s["heads"]) == {1 if width < 1 else 2} and set(s["widths"]) == {32 if width < 1 else 64}
    assert report["towers"]["language"]["layer_params_after"] < report["towers"]["language"]["layer_params_before"]
    assert (report["scoring_cost"]["forward_calls"] > 0) == (method == "mope")
    assert logits(m, batch).shape == (4, 20, model.config.vocab_size)


def test_cross_modal_metric_and_other_decoders_are_refused(llama):
    model, _, batch = llama
    with pytest.raises(ValueError, match="lm_loss"):
        structured_prune(copy.deepcopy(model), StructuredSettings("mope", width_ratio=0.5, metric="accuracy"), batch)
    with pytest.raises(NotImplementedError, match="LLaMA-style"):
        structured_towers(build_tiny_causal_lm("opt")[0])


def test_auto_metric_is_the_lm_loss_on_a_causal_lm(llama):
    model, _, batch = llama
    auto, explicit = copy.deepcopy(model), copy.deepcopy(model)
    structured_prune(auto, StructuredSettings("mope", width_ratio=1.0, depth_ratio=0.5), batch)
    structured_prune(explicit, StructuredSettings("mope", width_ratio=1.0, depth_ratio=0.5, metric="lm_loss"), batch)
    assert len(auto.model.layers) == len(explicit.model.layers) < len(model.model.layers)
    first, second = auto.state_dict(), explicit.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---- saving, loading, pipeline ---------------------------------------------------------------------------

def test_pruned_model_saves_and_loads_back_with_the_same_logits(llama, tmp_path):
    model, tokenizer, batch = llama
    m = copy.deepcopy(model)
    structured_prune(m, StructuredSettings("mope", width_ratio=0.5, depth_ratio=0.5, ffn_group=0.25, metric="lm_loss"),
                     batch)
    record_structure(m)
    save_tiny(m, tokenizer, tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["structure"]["language"]["heads"] == [1] and saved["num_hidden_layers"] == 2
    loaded = CausalLMAdapter().load(str(tmp_path / "pruned"), torch.float32, "cpu").model
    assert count_parameters(loaded) == count_parameters(m)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight or not model.config.tie_word_embeddings
    torch.testing.assert_close(logits(loaded, batch), logits(m, batch))


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    words = "river stone light window garden number morning paper table music".split()
    paragraphs = [" ".join(words[(i * 3 + j) % 10] for j in range(40)) + f" paragraph {i}." for i in range(200)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return {"name": "text_file", "path": str(path), "seq_len": 32, "eval_windows": 4}


def _params(model_dir, artifacts, corpus, method):
    return tiny_params(model_dir, artifacts, data=corpus, pruning={"method": method},
                       calibration={"n_samples": 8, "batch_size": 4}, scoring={"n_samples": 4},
                       evaluation={"max_samples": 4, "batch_size": 4},
                       structured={"width_ratio": 1.0 if method == "layer_drop" else 0.5, "depth_ratio": 0.5,
                                   "ffn_group": 0.25, "n_samples": 8, "metric": "lm_loss"},
                       tracking={"enabled": False})


@pytest.fixture(scope="module")
def upstream(llama, tmp_path_factory):
    """The stages before prune, run once (they do not depend on the pruning method)."""
    from flows.pipeline import TASKS

    model, tokenizer, _ = llama
    root = tmp_path_factory.mktemp("lm_pipeline")
    model_dir, corpus = save_tiny(model, tokenizer, root / "llama"), _corpus(root)
    for stage in ("prepare", "calibrate", "score", "allocate", "baseline"):
        TASKS[stage].fn(_params(model_dir, root / "artifacts", corpus, "mope"))
    return model_dir, root / "artifacts", corpus


@pytest.mark.parametrize("method", ["mope", "magnitude_structured", "layer_drop"])
def test_prune_stage_runs_end_to_end_on_the_tiny_llama(upstream, method):
    from flows.pipeline import TASKS
    from tasks.structured import prune_structured

    model_dir, artifacts, corpus = upstream
    params = _params(model_dir, artifacts, corpus, method)
    out = artifacts / "prune"
    assert prune_structured(params) == str(out)
    info = json.loads((out / "structure.json").read_text())
    assert info["method"] == method
    assert info["params_after"] < info["params_before"] and info["file_bytes_after"] < info["file_bytes_before"]
    assert len(info["structure"]["language"]["layers"]) == 1
    assert (info["scoring_cost"]["forward_calls"] > 0) == (method == "mope")
    removed = info["towers"]["language"]["removed_layers"][0]
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["groups"][f"model.layers.{removed}"] == 1.0
    TASKS["evaluate"].fn(params)
    metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
    assert math.isfinite(metrics["pruned"]["perplexity"]) and metrics["sparsity"]["overall"] > 0
    assert metrics["pruned"]["perplexity"] != metrics["dense"]["perplexity"]


# ---- distillation (recovery) ------------------------------------------------------------------------------

def _windows(n, length=16, seed=3):
    torch.manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pruned(model, width=0.5, depth=0.5):
    m = copy.deepcopy(model)
    structured_prune(m, StructuredSettings("magnitude_structured", width_ratio=width, depth_ratio=depth,
                                           ffn_group=0.25))
    return m


def test_token_kl_equals_a_hand_computation():
    """2 tokens, 3 classes, T = 2: KL(p || q) = sum_v p_v log(p_v / q_v), p = softmax(z_t / T), q = softmax(z_s / T),
    averaged over the two tokens and multiplied by T^2."""
    from vlmprune.structured.distill import token_kl

    z_s = [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    z_t = [[2.0, 0.0, 1.0], [3.0, 1.0, -1.0]]
    T = 2.0

    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    kls = []
    for s, t in zip(z_s, z_t):
        p, q = softmax(t), softmax(s)
        kls.append(sum(pv * math.log(pv / qv) for pv, qv in zip(p, q)))
    expected = T**2 * (kls[0] + kls[1]) / 2
    got = token_kl(torch.tensor([z_s]), torch.tensor([z_t]), T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the mask leaves out the second token
    assert token_kl(torch.tensor([z_s]), torch.tensor([z_t]), T, torch.tensor([[1, 0]])).item() == \
        pytest.approx(T**2 * kls[0], rel=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_lm_distill_loss_is_zero_when_student_is_teacher(llama, temperature):
    from vlmprune.structured.distill import DistillSettings, _lm_forward, layer_map, lm_distill_loss

    model, _, batch = llama
    student = copy.deepcopy(model)
    settings = DistillSettings(temperature=temperature, feature_weight=1.0)
    assert layer_map(student, model) == [0, 1]
    loss = lm_distill_loss(_lm_forward(student, batch), _lm_forward(model, batch), [0, 1], batch["attention_mask"],
                           settings)
    assert loss.item() == pytest.approx(0, abs=1e-6)


def test_features_are_matched_to_the_teacher_layer_each_kept_layer_came_from(llama):
    """The student keeps one layer with its own weights. Keeping layer 0, its output is the teacher's layer-0
    output, so the feature term is 0 under the right mapping while the logits differ; keeping layer 1, it is the
    relative MSE against the teacher's layer-1 output (taken here with a hook), not layer 0's."""
    from vlmprune.structured.distill import DistillSettings, _lm_forward, layer_map, lm_distill_loss
    from vlmprune.structured.surgery import tag_parent_indices
    from vlmprune.structured.towers import layer_output

    model, _, batch = llama
    features = DistillSettings(feature_weight=1.0, logit_weight=0.0)
    logits_only = DistillSettings(feature_weight=0.0, logit_weight=1.0)
    captured = []
    hook = model.model.layers[1].register_forward_hook(lambda m, args, out: captured.append(layer_output(out)))
    teacher_out = _lm_forward(model, batch)
    hook.remove()
    for kept in (0, 1):
        student = copy.deepcopy(model)
        tag_parent_indices(tower(student))
        keep_layers(tower(student), [kept])
        mapping = layer_map(student, model)
        assert mapping == [kept]
        student_out = _lm_forward(student, batch)
        feature = lm_distill_loss(student_out, teacher_out, mapping, batch["attention_mask"], features).item()
        if kept == 0:
            assert feature == pytest.approx(0, abs=1e-10)
        else:
            # relative MSE: mean squared difference over the teacher's mean square
            expected = ((student_out[1][0] - captured[0]) ** 2).mean().item() / (captured[0] ** 2).mean().item()
            assert feature == pytest.approx(expected, rel=1e-5)
            other = teacher_out[1][0]
            wrong = ((student_out[1][0] - other) ** 2).mean().item() / (other**2).mean().item()
            assert feature > 0 and abs(feature - wrong) > 1e-3 * wrong
        assert lm_distill_loss(student_out, teacher_out, mapping, batch["attention_mask"], logits_only).item() > 1e-6


@pytest.fixture(scope="module")
def sharp(llama):
    """The tiny LLaMA with its weights (not the norms) scaled by 8: at the default init its next-token
    distributions are nearly uniform (teacher-student KL ~1e-3), too flat to learn anything from."""
    model = copy.deepcopy(llama[0])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    return model


def test_lm_distillation_loss_falls_and_all_weights_train(sharp):
    from vlmprune.structured.distill import DistillSettings, distill

    model = sharp
    student = _pruned(model)
    before = copy.deepcopy(student.state_dict())
    settings = DistillSettings(steps=30, lr=3e-3, batch_size=4, eval_every=5, patience=3, val_fraction=0.25)
    history = distill(student, model, _windows(16), ["language"], settings, progress=False)
    vals = [h["val_loss"] for h in history["history"]]
    train = [h["train_loss"] for h in history["history"][1:]]
    assert history["best_val_loss"] < 0.9 * history["initial_val_loss"]  # held-out windows of random tokens
    assert history["best_val_loss"] == min(vals) and train[-1] < train[0]
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # embeddings (tied LM head), norms and every kept projection moved
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert {k for k in before if k.startswith("model.layers.")} <= changed
    assert all(p.requires_grad for p in student.parameters()) and all(p.requires_grad for p in model.parameters())


def test_lm_distillation_stops_early_and_restores_the_best_weights(sharp):
    """An absurd learning rate makes every validation worse than the start: training stops after ``patience``
    validations without improvement, and the initial (best) weights come back."""
    from vlmprune.structured.distill import DistillSettings, distill

    model = sharp
    student = _pruned(model)
    before = copy.deepcopy(student.state_dict())
    settings = DistillSettings(steps=50, lr=1.0, batch_size=4, eval_every=2, patience=2, val_fraction=0.25)
    history = distill(student, model, _windows(12), ["language"], settings, progress=False)
    assert history["best_step"] == 0
    assert history["steps_run"] == history["best_step"] + settings.patience * settings.eval_every < settings.steps
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_distilled_student_saves_and_loads_back_with_the_same_logits(llama, sharp, tmp_path):
    from vlmprune.structured.distill import DistillSettings, distill
    from vlmprune.structured.persist import load_structured_causal_lm

    _, tokenizer, batch = llama
    model = sharp
    student = _pruned(model)
    history = distill(student, model, _windows(12), ["language"],
                      DistillSettings(steps=6, lr=3e-3, batch_size=4, eval_every=3), progress=False)
    assert history["best_step"] > 0
    record_structure(student)
    save_tiny(student, tokenizer, tmp_path / "distilled")
    loaded = load_structured_causal_lm(tmp_path / "distilled")
    torch.testing.assert_close(logits(loaded, batch), logits(student, batch))
    assert not torch.allclose(logits(loaded, batch), logits(_pruned(model), batch))  # the trained weights were saved


def test_prune_stage_with_distillation_runs_end_to_end_and_reloads(upstream):
    """pruning.method mope with structured.distill.enabled on the tiny LLaMA: the saved student reloads and its
    validation loss against the dense teacher, recomputed on the same windows, is the best one the stage reported."""
    from flows.pipeline import TASKS
    from tasks.io import data_spec
    from tasks.structured import prune_structured
    from vlmprune.structured.distill import DistillSettings, validation_loss
    from vlmprune.structured.persist import load_structured_causal_lm

    model_dir, artifacts, corpus = upstream
    params = _params(model_dir, artifacts, corpus, "mope")
    distill_params = {"enabled": True, "n_samples": 12, "steps": 8, "batch_size": 4, "eval_every": 2, "lr": 1e-3}
    params = params.model_copy(update={"structured": params.structured.model_copy(
        update={"distill": params.structured.distill.model_copy(update=distill_params)})})
    out = artifacts / "prune"
    prune_structured(params)
    info = json.loads((out / "structure.json").read_text())
    recovery = info["distillation"]
    assert recovery["steps_run"] >= 2 and recovery["best_val_loss"] < recovery["initial_val_loss"]
    assert info["params_after"] < info["params_before"]
    student = load_structured_causal_lm(out / "model")
    assert count_parameters(student) == info["params_after"]
    adapter = CausalLMAdapter()
    teacher = adapter.load(str(model_dir), torch.float32, "cpu")
    data = adapter.make_calibration(teacher, data_spec(params), 12, params.structured.distill.seed)
    data = {k: v for k, v in data.items() if k != "index"}
    d = params.structured.distill
    settings = DistillSettings(**d.model_dump(exclude={"enabled", "n_samples"}))
    assert validation_loss(student, teacher.model, data, settings) == pytest.approx(recovery["best_val_loss"], rel=1e-4)
    TASKS["evaluate"].fn(params)
    metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
    assert math.isfinite(metrics["pruned"]["perplexity"])
