"""Block-wise offloading (runtime.offload): one group at a time off the disk or onto the device, with
results bit-identical to pruning in memory, and clear errors where it is not built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flows.pipeline import TASKS
from tests.tiny import build_tiny_causal_lm, interrupt_prune_after, save_tiny, tiny_params
from vlmprune.offload import Checkpoint, GroupOffloader, OffloadError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = " ".join(f"Sentence {i} tells of the river, the town and the {i % 7} bridges over the water." for i in range(400))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    model, tokenizer = build_tiny_causal_lm("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    save_tiny(model, tokenizer, root / "llama")
    (root / "corpus.txt").write_text(TEXT)
    return root


def run_params(llama_dir: Path, artifacts: Path, offload: str, method: str = "sparsegpt", allocation: str = "uniform"):
    scoring = {"method": "zeroth_order", "difference": "forward"} if allocation == "ecoflap" else {}
    return tiny_params(
        llama_dir / "llama", artifacts, model={"family": "causal_lm"},
        runtime={"offload": offload},
        data={"name": "text_file", "path": str(llama_dir / "corpus.txt"), "seq_len": 32, "eval_windows": 4},
        pruning={"method": method, "sparsity": 0.5}, tracking={"enabled": False},
        allocation={"method": allocation}, scoring=scoring,
    )


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, whether one file or shards with an index."""
    checkpoint = Checkpoint(directory)
    return checkpoint.read(sorted(checkpoint.names()))


def group_tensors(offloader: GroupOffloader, name: str) -> list[torch.Tensor]:
    return list(offloader.groups[name].state_dict().values())


# ---- the offloader on its own ------------------------------------------------------------------

def test_disk_offload_keeps_groups_on_meta_and_forwards_like_the_model(llama_dir):
    from vlmprune.adapters.causal_lm import CausalLMAdapter

    adapter = CausalLMAdapter()
    dense = adapter.load(str(llama_dir / "llama"), torch.float32, "cpu").model
    loaded, directory = adapter.load_skeleton(str(llama_dir / "llama"), torch.float32)
    model = loaded.model
    groups = dict(adapter.towers(model)[0].groups)
    offloader = GroupOffloader(model, groups, "disk", "cpu", Checkpoint(directory)).streaming()

    assert all(t.is_meta for name in groups for t in group_tensors(offloader, name))
    assert not model.model.embed_tokens.weight.is_meta and model.lm_head.weight is model.model.embed_tokens.weight
    seen = []
    groups["model.layers.1"].register_forward_pre_hook(
        lambda m, a: seen.append([t.is_meta for t in group_tensors(offloader, "model.layers.0")]))
    ids = torch.randint(5, 1000, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense(input_ids=ids).logits)
    assert seen == [[True] * len(seen[0])]  # layer 0 had left memory by the time layer 1 ran
    assert all(t.is_meta for name in groups for t in group_tensors(offloader, name))

    with offloader.hold("model.layers.0") as group:
        group.mlp.up_proj.weight.mul_(0)
    assert all(t.is_meta for t in group_tensors(offloader, "model.layers.0"))
    with offloader.hold("model.layers.0", write=False) as group:
        assert int(group.mlp.up_proj.weight.count_nonzero()) == 0  # the change was written and read back


def test_offloaded_save_writes_one_shard_per_group_that_loads_back(llama_dir, tmp_path):
    from vlmprune.adapters.causal_lm import CausalLMAdapter

    adapter = CausalLMAdapter()
    loaded, directory = adapter.load_skeleton(str(llama_dir / "llama"), torch.float32)
    groups = dict(adapter.towers(loaded.model)[0].groups)
    offloader = GroupOffloader(loaded.model, groups, "disk", "cpu", Checkpoint(directory), tmp_path / "work")
    offloader.save_pretrained(tmp_path / "saved")
    loaded.processor.save_pretrained(str(tmp_path / "saved"))
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + len(groups)
    original, saved = checkpoint_tensors(directory), checkpoint_tensors(tmp_path / "saved")
    assert original.keys() == saved.keys() and all(torch.equal(original[k], saved[k]) for k in original)
    reloaded = adapter.load(str(tmp_path / "saved"), torch.float32, "cpu").model  # from_pretrained reads it
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


# ---- the stages ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def in_memory(llama_dir, tmp_path_factory):
    params = run_params(llama_dir, tmp_path_factory.mktemp("memory") / "artifacts", "none")
    for name in ("prepare", "calibrate", "baseline", "score", "allocate", "prune", "evaluate"):
        TASKS[name].fn(params)
    return params


@pytest.mark.parametrize("allocation", ["ecoflap", "owl"])
@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_global_scores_of_an_offloaded_model_equal_in_memory(llama_dir, tmp_path, offload, allocation):
    results = []
    for mode in ("none", offload):
        params = run_params(llama_dir, tmp_path / mode, mode, allocation=allocation)
        for name in ("calibrate", "score"):
            TASKS[name].fn(params)
        results.append(json.loads((tmp_path / mode / "score/scores.json").read_text())["groups"])
    key = "score" if allocation == "ecoflap" else "outlier_ratio"
    assert [g[key] for g in results[0]] == [g[key] for g in results[1]]
    assert all(g[key] > 0 for g in results[0])


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_offloaded_prune_and_evaluate_are_bit_identical_to_in_memory(in_memory, llama_dir, tmp_path, offload):
    params = run_params(llama_dir, tmp_path / "artifacts", offload)
    for name in ("prepare", "calibrate", "baseline", "score", "allocate", "prune", "evaluate"):
        TASKS[name].fn(params)
    memory, offloaded = Path(in_memory.artifacts), Path(params.artifacts)
    first, second = checkpoint_tensors(memory / "prune/model"), checkpoint_tensors(offloaded / "prune/model")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    sparsity = [json.loads((d / "prune/sparsity.json").read_text()) for d in (memory, offloaded)]
    assert sparsity[0] == sparsity[1] and sparsity[0]["overall"] == pytest.approx(0.5, abs=0.01)
    metrics = [json.loads((d / "evaluate/metrics.json").read_text()) for d in (memory, offloaded)]
    assert metrics[0]["pruned"] == metrics[1]["pruned"] and metrics[0]["dense"] == metrics[1]["dense"]
    meta = json.loads((offloaded / "prune/meta.json").read_text())
    assert meta["offload"] == offload and meta["offloaded_groups"] == 2  # the offloaded path did run
    assert not any((offloaded / ".offload").glob("offload-*/*.safetensors"))  # the working folder is gone


def test_offloaded_prune_resumes_bit_identical(in_memory, llama_dir, tmp_path, monkeypatch):
    params = run_params(llama_dir, tmp_path / "artifacts", "disk")
    for name in ("calibrate", "score", "allocate"):
        TASKS[name].fn(params)
    resume_saving = interrupt_prune_after(monkeypatch, 1, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        TASKS["prune"].fn(params)
    resume_saving()
    TASKS["prune"].fn(params)
    assert json.loads((tmp_path / "artifacts/prune/meta.json").read_text())["resumed_groups"] == 1
    first = checkpoint_tensors(Path(in_memory.artifacts) / "prune/model")
    second = checkpoint_tensors(tmp_path / "artifacts/prune/model")
    assert all(torch.equal(first[k], second[k]) for k in first)


# ---- where it is not built -------------------------------------------------------------------------

def test_disk_offload_of_a_gguf_alias_says_to_convert(tmp_path):
    from vlmprune.adapters.causal_lm import CausalLMAdapter

    with pytest.raises(OffloadError, match="vlmprune convert smollm2 DIRECTORY"):
        CausalLMAdapter().load_skeleton("smollm2", torch.float32)


def test_disk_offload_needs_a_safetensors_checkpoint(tmp_path):
    with pytest.raises(OffloadError, match="has none"):
        Checkpoint(tmp_path)


def test_first_order_scoring_with_offload_is_refused_naming_the_fields(llama_dir, tmp_path):
    params = run_params(llama_dir, tmp_path / "artifacts", "disk").model_copy(deep=True)
    params.allocation.method = "ecoflap"
    params.scoring.method = "first_order"
    with pytest.raises(OffloadError, match=r"scoring.method: first_order .* runtime.offload: none"):
        TASKS["score"].fn(params)


def test_disk_offload_of_another_family_is_refused(tiny_dual_encoder_dir, tmp_path):
    params = tiny_params(tiny_dual_encoder_dir, tmp_path / "artifacts", runtime={"offload": "disk"})
    with pytest.raises(OffloadError, match="causal_lm models only"):
        TASKS["calibrate"].fn(params)


def test_convert_writes_a_checkpoint_that_disk_offload_reads(llama_dir, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(llama_dir / "llama"), str(out), "-S", "model.family=causal_lm"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.up_proj.weight" in f.keys()
    assert Checkpoint(out).names() == Checkpoint(llama_dir / "llama").names()
