"""PAR token and layer pruning (vlmprune/par/) on a tiny LLaVA built from a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import build_tiny_llava, save_tiny
from vlmprune.par.contributions import fit_contributions, token_contributions
from vlmprune.par.decoder import decoder_of
from vlmprune.par.engine import Plan, decode, generate, keep_count, prefill, run_layer_weighted, run_prefix
from vlmprune.par.policies import AttentionPolicy, RandomPolicy, RouterPolicy, block_influence, top_mask
from vlmprune.par.router import MetaRouter, RouterConfig, load_router, save_router
from vlmprune.par.train import make_examples, rank_loss, router_loss, train_router

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
    grad_enabled = []
    embed = dec.embed_inputs
    dec.embed_inputs = lambda *a: grad_enabled.append(torch.is_grad_enabled()) or embed(*a)
    try:
        influence = block_influence(dec, ids, pixels, batch_size=1)
    finally:
        dec.embed_inputs = embed
    assert grad_enabled == [False] * len(pixels)  # embedded one image at a time, with no autograd graph
    assert influence == pytest.approx(block_influence(dec, ids[:1], pixels, batch_size=len(pixels)), abs=1e-6)
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


def test_fit_contributions_recovers_an_additive_distance():
    """distance_r = 2 - sum_j c_j keep_rj exactly: the ridge fit returns c (up to the tiny ridge)."""
    g = torch.Generator().manual_seed(0)
    c = torch.tensor([0.5, 0.0, 0.25, 1.0, -0.125, 0.0])
    keep = torch.rand(40, 6, generator=g) < 0.5
    distance = 2.0 - keep.float() @ c
    assert torch.allclose(fit_contributions(keep, distance, ridge=1e-9), c, atol=1e-5)
    shrunk = fit_contributions(keep, distance, ridge=10.0)  # the ridge pulls every coefficient towards 0
    assert shrunk.abs().sum() < c.abs().sum()


@pytest.mark.parametrize("visual_first", [False, True])
def test_token_contributions_pick_keep_sets_closer_to_dense_than_random(llava, visual_first):
    """Keeping the tokens with the largest measured contributions gives a smaller KL to the dense model
    than random keep-sets of the same size (a wrong sign or a misplaced mask fails this)."""
    model, _, dec = llava
    ids, pixels = prompt(model, batch=6, visual_first=visual_first)
    examples = make_examples(dec, ids[:1], pixels, k=1, max_new_tokens=2, batch_size=6)
    c = token_contributions(dec, examples, 1, [0.5], n_subsets=48)
    assert c.shape == (6, N_VISUAL)

    class Scores:
        def __init__(self, scores):
            self.scores = scores

        def token_scores(self, hidden, mask):
            return self.scores

    def distance(scores):
        with torch.no_grad():
            return float(router_loss(dec, Scores(scores), examples, Plan(0.5, 1.0, 1)))

    g = torch.Generator().manual_seed(1)
    random_kl = sum(distance(torch.rand(6, N_VISUAL, generator=g)) for _ in range(8)) / 8
    best, worst = distance(c), distance(-c)
    assert best < 0.9 * random_kl and worst > 2 * random_kl, (best, random_kl, worst)


def test_rank_loss_is_listnet():
    """- sum_j softmax(z)_j log softmax(s)_j with z the per-row standardised contributions, by hand."""
    class Fixed:
        def token_scores(self, hidden, mask):
            return torch.tensor([[0.0, 1.0, 2.0]])

    contributions = torch.tensor([[1.0, 2.0, 3.0]])  # z = (-1, 0, 1)
    batch = type("B", (), {"prompt_len": 1, "hidden": torch.zeros(1, 1, 4), "visual_mask": torch.ones(1, 1)})()
    p = torch.softmax(torch.tensor([-1.0, 0.0, 1.0]), 0)
    q = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert float(rank_loss(Fixed(), batch, contributions)) == pytest.approx(float(-(p * q).sum()), rel=1e-6)


def test_trained_token_head_ranks_like_the_contributions(llava):
    model, _, dec = llava
    ids, pixels = prompt(model, batch=16)
    examples = make_examples(dec, ids[:1], pixels, k=1, max_new_tokens=2, batch_size=8)
    c = token_contributions(dec, examples, 1, [0.5], n_subsets=24)
    router = router_for(dec)

    def agreement():
        scores = router.token_scores(examples.hidden[:, :examples.prompt_len],
                                     examples.visual_mask[:, :examples.prompt_len]).detach()
        return float((top_mask(scores, 8) & top_mask(c, 8)).sum()) / (16 * 8)

    before = agreement()
    train_router(dec, router, examples, steps=40, lr=1e-2, batch_size=8, points=[(0.5, 1.0)],
                 token_loss="contributions", n_subsets=24)
    assert agreement() > max(before, 0.5) + 0.1, (before, agreement())
    with pytest.raises(ValueError, match="straight_through, contributions"):
        train_router(dec, router, examples, steps=1, lr=1e-2, batch_size=8, token_loss="listnet")


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

    spread = _params(model_dir, tmp_path / "on", spread=1.0, token_loss="contributions", token_sets="spread")
    train_stage.fn(spread)  # a router that learned around the prior's keep-set; then two more policies
    evaluate_tokens.fn(spread)
    rows = json.loads((tmp_path / "on" / "evaluate_tokens" / "metrics.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"dense", "router", "attention", "random", "router+spread", "dither"}
    assert len(rows) == 1 + 5 * 3


# ---- par.model: the router trained on the pruned model, registered beside it, loaded with it ----

def test_par_model_param_validates(tmp_path):
    from params.schema import ParamsError

    assert _params(tmp_path, tmp_path).par.model == "dense"  # the default: today's behaviour
    assert _params(tmp_path, tmp_path, model="pruned").par.model == "pruned"
    with pytest.raises(ParamsError, match=r"par\.model = 'half': Input should be 'dense' or 'pruned'"):
        _params(tmp_path, tmp_path, model="half")


def _save(model, tokenizer, path, zero_half: bool = False):
    """Save ``model`` as its adapter saves it; with ``zero_half``, a copy with the first half of every
    language-model MLP down-projection zeroed (a stand-in for the prune stage's output: same config,
    other weights)."""
    import copy

    from vlmprune.adapters import ADAPTERS, LoadedModel

    pruned = copy.deepcopy(model)
    if zero_half:
        with torch.no_grad():
            for layer in decoder_of(pruned).layers:
                layer.mlp.down_proj.weight[:, : layer.mlp.down_proj.weight.shape[1] // 2] = 0
    family = "vision_lm" if type(model).__name__ == "VisionLM" else "llava"
    path.mkdir(parents=True, exist_ok=True)
    ADAPTERS.get(family)().save(LoadedModel(pruned, tokenizer), path)
    return path


def _tiny_vision_lm():
    from tests.tiny import build_tiny_vision_lm

    return build_tiny_vision_lm()


@pytest.mark.parametrize("build", [lambda: build_tiny_llava(text_layers=4), _tiny_vision_lm],
                         ids=["llava", "vision_lm"])
def test_pruned_router_is_trained_and_evaluated_on_the_prune_output(tmp_path, monkeypatch, build):
    import tasks.router as stages
    from vlmprune.errors import ArtifactError
    from vlmprune.par.router import model_fingerprint

    model, tokenizer = build()
    dense_dir = _save(model, tokenizer, tmp_path / "model")
    params = _params(dense_dir, tmp_path / "run", model="pruned")
    with pytest.raises(ArtifactError, match="run the prune stage first"):
        stages.train_router.fn(params)
    pruned_dir = tmp_path / "run" / "prune" / "model"
    _save(model, tokenizer, pruned_dir, zero_half=True)

    teachers = []
    make = stages.make_examples
    monkeypatch.setattr(stages, "make_examples", lambda dec, *a, **kw: teachers.append(dec) or make(dec, *a, **kw))
    stages.train_router.fn(params)
    down = teachers[0].layers[0].mlp.down_proj.weight  # the teacher of the router's training
    assert bool((down[:, : down.shape[1] // 2] == 0).all()) and bool((down[:, down.shape[1] // 2:] != 0).any())
    facts = json.loads((tmp_path / "run" / "train_router" / "router.json").read_text())
    assert facts["model_id"] == str(pruned_dir) and facts["par_model"] == "pruned"
    assert facts["model"] == model_fingerprint(pruned_dir)
    assert facts["model"]["sha256"] != model_fingerprint(dense_dir)["sha256"]

    stages.evaluate_tokens.fn(params)
    metrics = json.loads((tmp_path / "run" / "evaluate_tokens" / "metrics.json").read_text())
    assert metrics["par_model"] == "pruned" and len(metrics["rows"]) == 10
    # the prune output changed after the router was trained: evaluate_tokens refuses the stale router
    _save(model, tokenizer, pruned_dir)
    with pytest.raises(ArtifactError, match="rerun the train_router stage"):
        stages.evaluate_tokens.fn(params)


def test_model_fingerprint_is_config_and_weights(tmp_path):
    from vlmprune.errors import ArtifactError
    from vlmprune.par.router import model_fingerprint

    model, tokenizer = build_tiny_llava()
    a = save_tiny(model, tokenizer, tmp_path / "a")
    b = save_tiny(model, tokenizer, tmp_path / "b")
    (b / "router").mkdir()
    (b / "notes.txt").write_text("not part of the model")
    assert model_fingerprint(a) == model_fingerprint(b)  # same config and weights, other extra files
    assert model_fingerprint(a)["files"] == ["config.json", "model.safetensors"]
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    assert model_fingerprint(save_tiny(model, tokenizer, tmp_path / "c")) != model_fingerprint(a)
    with pytest.raises(ArtifactError, match="no model weights"):
        model_fingerprint(tmp_path / "b" / "router")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The whole pipeline on a tiny LLaVA with par.model pruned and MLflow on (a store in a temporary
    folder, run from there so that mlartifacts/ lands there too)."""
    from flows.pipeline import STAGES, TASKS
    from tests.tiny import family_params

    root = tmp_path_factory.mktemp("par_register")
    model, tokenizer = build_tiny_llava(text_layers=4)
    model_dir = save_tiny(model, tokenizer, root / "model")
    par = {"enabled": True, "model": "pruned", "k": 1, "token_ratios": [1.0, 0.5], "layer_ratios": [1.0, 0.5],
           "router_width": 8, "steps": 2, "batch_size": 4, "train_samples": 4, "eval_samples": 4,
           "latency_repeats": 1}
    tracking = {"enabled": True, "uri": f"sqlite:///{root / 'mlflow.db'}", "model_name": "tiny-par"}
    params = family_params(model_dir, root / "artifacts", {"name": "digits"}, par=par, tracking=tracking,
                           evaluation={"max_samples": 8})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in STAGES:
            TASKS[name].fn(params)
    return root, params


def test_register_attaches_the_router_beside_the_pruned_model(registered):
    import mlflow

    from vlmprune.par.router import load_model_router, load_router, model_fingerprint

    root, params = registered
    record = json.loads((root / "artifacts" / "register" / "registration.json").read_text())
    note = record["par_router"]
    assert note["attached"] and note["path"] == "model/router"
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny-par@candidate",
                                                          dst_path=str(root / "download"),
                                                          tracking_uri=params.tracking.uri))
    assert {"config.json", "model.safetensors", "router"} <= {p.name for p in downloaded.iterdir()}
    assert sorted(p.name for p in (downloaded / "router").iterdir()) == ["router.json", "router.safetensors"]
    assert note["model_sha256"] == model_fingerprint(downloaded)["sha256"] \
        == model_fingerprint(root / "artifacts" / "prune" / "model")["sha256"]
    trained = load_router(root / "artifacts" / "train_router").state_dict()
    loaded = load_model_router(downloaded).state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_model_router_refuses_another_model_and_a_model_without_one(registered, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from tasks.register import router_to_attach
    from vlmprune.errors import ArtifactError
    from vlmprune.par.router import RouterMismatchError, load_model_router

    root, params = registered
    with pytest.raises(ArtifactError, match="no PAR router beside the model"):
        load_model_router(root / "model")  # the dense model: never had one
    other = shutil.copytree(root / "artifacts" / "prune" / "model", tmp_path / "other")
    shutil.copytree(root / "artifacts" / "train_router", other / "router")
    load_model_router(other)  # the prune output with the trained router: they match
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in weights if k.endswith("down_proj.weight"))
    weights[name] = weights[name] + 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RouterMismatchError, match="was trained on a model with fingerprint"):
        load_model_router(other)
    with pytest.raises(ArtifactError, match="rerun the train_router stage"):
        router_to_attach(params, other)  # register refuses a router trained before the last prune


def test_register_notes_why_no_router_is_attached(registered):
    from tasks.register import register

    root, params = registered
    for par, reason in ((params.par.model_copy(update={"model": "dense"}), "par.model is dense"),
                        (params.par.model_copy(update={"enabled": False}), "par.enabled is false")):
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            register.fn(params.model_copy(update={"par": par}))
        note = json.loads((root / "artifacts" / "register" / "registration.json").read_text())["par_router"]
        assert note["attached"] is False and note["reason"].startswith(reason)


def test_dvc_and_flow_order_par_after_prune_and_register_last():
    import yaml

    from flows.pipeline import STAGES

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    for name in ("train_router", "evaluate_tokens"):  # par.model pruned reads the prune output
        assert "artifacts/prune" in stages[name]["deps"] and "par" in stages[name]["params"]
    assert "artifacts/train_router" in stages["register"]["deps"]  # the router it attaches
    assert {"par.enabled", "par.model"} <= set(stages["register"]["params"])
    order = STAGES.index
    assert order("prune") < order("train_router") < order("evaluate_tokens") < order("register") == len(STAGES) - 1
