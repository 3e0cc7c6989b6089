"""Structured pruning (MoPE-CLIP, magnitude, layer drop) on tiny models: surgery against masked
forwards and hand-counted parameters, save/load, MoPE's cached batched scoring against plain
removal, distillation, and one pipeline run through ``prune_structured``."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.tiny import build_tiny_clip, build_tiny_dual_encoder, tiny_params
from vlmprune.structured import StructuredSettings, count_parameters, current_structure, structured_prune
from vlmprune.structured.distill import DistillSettings, distill, distill_loss
from vlmprune.structured.magnitude import MagnitudeScorer, uniform_drop
from vlmprune.structured.metrics import pair_metrics
from vlmprune.structured.mope import MoPEScorer, contiguous_groups
from vlmprune.structured.persist import load_structured_clip, record_structure
from vlmprune.structured.surgery import keep_heads, keep_layers, keep_width
from vlmprune.structured.towers import structured_towers, tower_embed

DIGITS = "zero one two three four five six seven eight nine".split()


def pairs(tokenizer, n=12, size=32, seed=0):
    torch.manual_seed(seed)
    captions = [f"a photo of the digit {DIGITS[i % 10]}" for i in range(n)]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    return {"pixel_values": torch.randn(n, 3, size, size), "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"], "labels": torch.arange(n) % 10}


def outputs(model, batch):
    with torch.no_grad():
        return {t.name: tower_embed(model, t, batch) for t in structured_towers(model)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def dual():
    model, tokenizer = build_tiny_dual_encoder()
    return model, tokenizer, pairs(tokenizer)


@pytest.fixture(scope="module")
def clip():
    model, processor = build_tiny_clip()
    return model, processor, pairs(processor.tokenizer)


def tower(model, name):
    return structured_towers(model, [name])[0]


# ---- surgery -----------------------------------------------------------------------------------

def test_keeping_everything_changes_nothing(dual, clip):
    for model, _, batch in (dual, clip):
        pruned = copy.deepcopy(model)
        for t in structured_towers(pruned):
            keep_layers(t, range(len(t.layers)))
            for layer in t.layers:
                if (a := t.attention(layer)) is not None:
                    keep_heads(a, range(a.n_heads))
                if (w := t.width(layer)) is not None:
                    keep_width(w, range(w.size))
        dense, after = outputs(model, batch), outputs(pruned, batch)
        for name in dense:
            assert torch.equal(dense[name], after[name])


@pytest.mark.parametrize("family", ["dual", "clip"])
def test_removing_a_head_equals_zeroing_its_values(family, dual, clip):
    """Head h contributes W_o[:, h] softmax(.) v_h; with v_h's rows and bias zeroed it contributes 0."""
    model, _, batch = dual if family == "dual" else clip
    zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
    a = tower(zeroed, "text").attention(tower(zeroed, "text").layers[1])
    d = a.head_dim
    with torch.no_grad():
        a.v.weight[2 * d:3 * d] = 0
        a.v.bias[2 * d:3 * d] = 0
    t = tower(pruned, "text")
    keep_heads(t.attention(t.layers[1]), [0, 1, 3])
    assert t.attention(t.layers[1]).n_heads == 3
    torch.testing.assert_close(outputs(pruned, batch)["text"], outputs(zeroed, batch)["text"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(outputs(pruned, batch)["text"], outputs(model, batch)["text"], atol=1e-4)


def test_removing_ffn_neurons_and_channels_equals_zeroing_them(dual):
    """FFN: gelu(0) = 0, so a neuron with a zero row of W_up (and bias) adds nothing. MBConv: a channel
    whose project-conv column is zero adds nothing."""
    model, _, batch = dual
    drop = [0, 5, 17]
    zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
    wz = tower(zeroed, "text").width(tower(zeroed, "text").layers[0])
    vz = tower(zeroed, "vision").width(tower(zeroed, "vision").layers[4])
    with torch.no_grad():
        wz.up.weight[drop] = 0
        wz.up.bias[drop] = 0
        vz.down.weight[:, drop] = 0
    wp = tower(pruned, "text").width(tower(pruned, "text").layers[0])
    vp = tower(pruned, "vision").width(tower(pruned, "vision").layers[4])
    keep_width(wp, [i for i in range(wp.size) if i not in drop])
    keep_width(vp, [i for i in range(vp.size) if i not in drop])
    expected, got = outputs(zeroed, batch), outputs(pruned, batch)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)


def test_dropping_a_residual_layer_equals_skipping_it(dual):
    model, _, batch = dual
    skipped, pruned = copy.deepcopy(model), copy.deepcopy(model)
    skipped.text.encoder.layer[1].register_forward_hook(lambda m, args, out: args[0])
    keep_layers(tower(pruned, "text"), [0])
    torch.testing.assert_close(outputs(pruned, batch)["text"], outputs(skipped, batch)["text"])
    with pytest.raises(ValueError, match="no residual path"):
        keep_layers(tower(copy.deepcopy(model), "vision"), [i for i in range(16) if i != 1])  # block 1: stride 2


def test_parameter_counts_fall_by_the_hand_counted_amount(dual):
    model, _, _ = dual
    hidden, d = 32, 8  # tiny BERT: hidden 32, 4 heads of 8, FFN 64
    m = copy.deepcopy(model)
    t = tower(m, "text")
    before = count_parameters(m)
    keep_heads(t.attention(t.layers[0]), [0, 2])                   # two heads: q, k, v rows (+bias), o columns
    assert before - count_parameters(m) == 2 * (3 * (d * hidden + d) + hidden * d)
    before = count_parameters(m)
    keep_width(t.width(t.layers[0]), range(60))                    # four neurons: W_up row + bias, W_down column
    assert before - count_parameters(m) == 4 * (hidden + 1 + hidden)
    v = tower(m, "vision")
    block = v.layers[4]
    c_in, c_out, k = block._expand_conv.in_channels, block._project_conv.out_channels, block._depthwise_conv.kernel_size[0]
    before = count_parameters(m)
    keep_width(v.width(block), range(v.width(block).size - 3))     # three channels: expand, BN0, depthwise, BN1, project
    assert before - count_parameters(m) == 3 * (c_in + 2 + k * k + 2 + c_out)
    before, layer_params = count_parameters(m), count_parameters(t.layers[1])
    keep_layers(t, [0])
    assert before - count_parameters(m) == layer_params
    assert current_structure(m)["text"] == {"layers": [0], "heads": [2], "widths": [60]}


def test_pruned_dual_encoder_saves_and_reloads(dual, tmp_path):
    from vlmprune.models.dual_encoder import DualEncoder

    model, _, batch = dual
    pruned = copy.deepcopy(model)
    structured_prune(pruned, StructuredSettings("magnitude_structured", width_ratio=0.5, depth_ratio=0.5, ffn_group=0.25))
    record_structure(pruned)
    pruned.save_pretrained(tmp_path)
    back = DualEncoder.from_pretrained(tmp_path)
    assert count_parameters(back) == count_parameters(pruned) < count_parameters(model)
    for name, value in outputs(pruned, batch).items():
        assert torch.equal(outputs(back, batch)[name], value)


def test_pruned_clip_saves_and_reloads(clip, tmp_path):
    from transformers import CLIPModel

    model, _, batch = clip
    pruned = copy.deepcopy(model)
    structured_prune(pruned, StructuredSettings("mope", width_ratio=0.5, depth_ratio=0.5, ffn_group=0.25), batch)
    record_structure(pruned)
    pruned.save_pretrained(tmp_path)
    back = load_structured_clip(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["structure"] == current_structure(pruned)
    for name, value in outputs(pruned, batch).items():
        assert torch.equal(outputs(back, batch)[name], value)
    with pytest.raises(RuntimeError):
        CLIPModel.from_pretrained(tmp_path)  # the plain loader refuses the smaller tensors


# ---- scores --------------------------------------------------------------------------------------

def test_metrics_by_hand():
    e = torch.eye(3)
    image, labels = e.clone(), torch.tensor([0, 1, 2])
    text = torch.stack([e[0], e[0], e[2]])  # caption 1 looks like class 0
    m = pair_metrics(image, text, labels, scale=1.0)
    assert m["accuracy"].item() == pytest.approx(2 / 3)        # image 1 is closest to class 0
    assert m["retrieval"].item() == pytest.approx((2 / 3 + 2 / 3) / 2)
    logits = image @ text.T
    loss_i = -torch.log_softmax(logits, 1).diagonal().mean()
    loss_t = -torch.log_softmax(logits.T, 1).diagonal().mean()
    assert m["loss"].item() == pytest.approx(((loss_i + loss_t) / 2).item(), rel=1e-6)


def test_cached_batched_mope_equals_removing_each_module(dual):
    """Scores from cached layer inputs and batched masks equal the metric of the physically pruned model."""
    model, _, batch = dual
    scorer = MoPEScorer(model, batch, metric="loss", max_rows=24)  # 24 rows: 2 candidates per call
    t = tower(model, "text")
    heads = scorer.heads(t)
    groups = [contiguous_groups(64, 0.25)] * 2
    width = scorer.width(t, groups)
    layers = scorer.layers(t)
    dense_loss = pair_metrics(scorer.embeddings["vision"], scorer.embeddings["text"], batch["labels"], scorer.scale)["loss"]

    def loss_rise(prune):
        m = copy.deepcopy(model)
        prune(tower(m, "text"))
        emb = outputs(m, batch)["text"]
        return (pair_metrics(scorer.embeddings["vision"], emb, batch["labels"], scorer.scale)["loss"] - dense_loss).item()

    for layer in range(2):
        for h in range(4):
            expected = loss_rise(lambda t: keep_heads(t.attention(t.layers[layer]), [j for j in range(4) if j != h]))
            assert heads[layer][0][h].item() == pytest.approx(expected, abs=1e-5)
        for g, group in enumerate(groups[layer]):
            expected = loss_rise(lambda t: keep_width(t.width(t.layers[layer]), [i for i in range(64) if i not in group]))
            assert width[layer][0][g].item() == pytest.approx(expected, abs=1e-5)
        expected = loss_rise(lambda t: keep_layers(t, [1 - layer]))
        assert layers[0][layer].item() == pytest.approx(expected, abs=1e-5)
    # 2 dense tower forwards; heads: 2 layers x 4 heads, groups: 2 x 4, layers: 2 -> 18 candidates in
    # 2 x 2 + 2 x 2 + 2 = 10 calls (2 candidates per call)
    assert scorer.cost["candidates"] == 18
    assert scorer.cost["forward_calls"] == 2 + 10
    assert scorer.cost["full_forward_equivalents"] == pytest.approx(2 + (4 + 2) + (4 + 2) + (0.5 + 0))


def test_mope_finds_a_dead_and_a_dominant_head(dual):
    """Head 0 of text layer 1 is made dominant (values x 30), head 3 dead (output columns zero).
    Against image embeddings equal to the dense text embeddings, removing the dead head changes
    nothing (MoPE exactly 0) and removing the dominant one costs the most; width pruning to one head
    of four keeps the dominant head."""
    model, tokenizer, _ = dual
    batch = pairs(tokenizer, n=10)  # ten distinct captions
    m = copy.deepcopy(model)
    a = tower(m, "text").attention(tower(m, "text").layers[1])
    d = a.head_dim
    with torch.no_grad():
        a.v.weight[:d] *= 30
        a.o.weight[:, 3 * d:] = 0
    batch = {**batch, "labels": torch.arange(len(batch["labels"]))}
    scorer = MoPEScorer(m, batch, metric="accuracy")
    scorer.embeddings["vision"] = scorer.embeddings["text"].clone()
    scorer.dense = scorer._metrics("text", scorer.embeddings["text"])
    scores, ties = scorer.heads(tower(m, "text"))[1]
    assert scores[3].item() == 0 and ties[3].item() == pytest.approx(0, abs=1e-6)
    assert int(torch.argmax(scores + 1e-3 * ties)) == 0 and scores[0] > 0
    from vlmprune.structured.plan import keep_top
    assert keep_top((scores, ties), 1) == [0]


def test_magnitude_scores_by_hand(dual):
    model, _, _ = dual
    m = copy.deepcopy(model)
    t = tower(m, "text")
    a = t.attention(t.layers[0])
    with torch.no_grad():
        for p in (a.q.weight, a.k.weight, a.v.weight, a.o.weight):
            p.fill_(1.0)
        a.o.weight[:, 8:16] = 3.0  # head 1's columns of o
    norms = MagnitudeScorer().heads(t)[0][0]
    # per head: 3 matrices x (8 rows x 32) ones + o columns (32 x 8) of 1 (or 3)
    assert norms[0].item() == pytest.approx((3 * 256 + 256) ** 0.5)
    assert norms[1].item() == pytest.approx((3 * 256 + 9 * 256) ** 0.5)
    assert uniform_drop([0, 1, 2, 3, 4, 5], 3) == [1, 3, 5]
    assert uniform_drop([2, 4, 6, 7, 9], 2) == [4, 7]  # floor(0.5 * 2.5) = 1, floor(1.5 * 2.5) = 3
    assert uniform_drop([1, 2], 0) == []


@pytest.mark.parametrize("method,width,depth", [("mope", 0.5, 0.5), ("magnitude_structured", 0.75, 1.0),
                                                ("layer_drop", 1.0, 0.5)])
def test_width_then_depth_reach_the_counts(dual, method, width, depth):
    model, _, batch = dual
    m = copy.deepcopy(model)
    report = structured_prune(m, StructuredSettings(method, width_ratio=width, depth_ratio=depth, ffn_group=0.25,
                                                    towers=["text", "vision"]), batch)
    s = current_structure(m)
    assert len(s["text"]["layers"]) == (1 if depth < 1 else 2)
    assert set(s["text"]["heads"]) == {round(4 * width)}
    assert set(s["text"]["widths"]) == {64 * round(4 * width) // 4}
    # vision: 16 blocks, 9 residual; depth 0.5 removes round(8) of them
    assert len(s["vision"]["layers"]) == (8 if depth < 1 else 16)
    assert report["towers"]["text"]["layer_params_after"] < report["towers"]["text"]["layer_params_before"]
    assert (report["scoring_cost"]["forward_calls"] > 0) == (method == "mope")


# ---- distillation --------------------------------------------------------------------------------

def test_distill_loss_is_zero_for_the_teacher_and_recovers_a_pruned_student(dual):
    model, tokenizer, _ = dual
    data = pairs(tokenizer, n=40, seed=1)
    teacher = outputs(model, data)
    settings = DistillSettings(steps=30, lr=1e-3, batch_size=16, eval_every=5, patience=3)
    assert distill_loss(teacher, teacher, 10.0, ["text"], settings).item() == pytest.approx(0, abs=1e-6)
    student = copy.deepcopy(model)
    structured_prune(student, StructuredSettings("magnitude_structured", width_ratio=0.25, depth_ratio=0.5,
                                                 towers=["text"]))
    vision_before = copy.deepcopy(student.vision.state_dict())
    history = distill(student, model, data, ["text"], settings, progress=False)
    assert history["best_val_loss"] < history["initial_val_loss"]
    assert all(torch.equal(v, student.vision.state_dict()[k]) for k, v in vision_before.items())  # untouched tower
    assert all(p.requires_grad for p in student.parameters())


# ---- params and pipeline -------------------------------------------------------------------------

def test_params_accept_structured_methods(tiny_dual_encoder_dir, tmp_path):
    from params.schema import ParamsError

    params = tiny_params(tiny_dual_encoder_dir, tmp_path, pruning={"method": "mope"}, structured={"n_samples": 16})
    assert params.structured.width_ratio == 0.5
    with pytest.raises(ParamsError, match="exceeds calibration.n_samples"):
        tiny_params(tiny_dual_encoder_dir, tmp_path, pruning={"method": "mope"})
    with pytest.raises(ParamsError, match="width_ratio"):
        tiny_params(tiny_dual_encoder_dir, tmp_path, pruning={"method": "layer_drop"})
    with pytest.raises(ParamsError, match="not one of"):
        tiny_params(tiny_dual_encoder_dir, tmp_path, pruning={"method": "mop"})


def test_pipeline_run_through_prune_structured(tiny_dual_encoder_dir, tmp_path):
    from flows.pipeline import TASKS
    from tasks.structured import prune_structured
    from vlmprune.models.dual_encoder import DualEncoder

    params = tiny_params(tiny_dual_encoder_dir, tmp_path / "artifacts", pruning={"method": "mope", "towers": ["text"]},
                         structured={"width_ratio": 0.5, "depth_ratio": 0.5, "ffn_group": 0.25, "n_samples": 16,
                                     "distill": {"enabled": True, "n_samples": 24, "steps": 4, "eval_every": 2}},
                         tracking={"enabled": False})
    for stage in ("prepare", "calibrate", "score", "allocate", "baseline"):
        TASKS[stage].fn(params)
    out = tmp_path / "artifacts" / "prune"
    assert prune_structured(params) == str(out)
    info = json.loads((out / "structure.json").read_text())
    assert info["params_after"] < info["params_before"]
    assert info["file_bytes_after"] < info["file_bytes_before"]
    assert info["scoring_cost"]["forward_calls"] > 0 and info["distillation"]["steps_run"] >= 2
    assert info["structure"]["text"]["heads"] == [2] and len(info["towers"]["text"]["removed_layers"]) == 1
    sparsity = json.loads((out / "sparsity.json").read_text())
    removed = info["towers"]["text"]["removed_layers"][0]
    assert sparsity["groups"][f"text.encoder.layer.{removed}"] == 1.0
    assert sparsity["groups"][f"text.encoder.layer.{1 - removed}"] == pytest.approx(0.5)
    assert sparsity["towers"]["text"] == pytest.approx(0.75)
    model = DualEncoder.from_pretrained(out / "model")
    assert count_parameters(model) == info["params_after"]
    TASKS["evaluate"].fn(params)  # evaluate runs unchanged on the structurally pruned model
    metrics = json.loads((tmp_path / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert metrics["sparsity"]["overall"] > 0 and "zero_shot_accuracy" in metrics["pruned"]
