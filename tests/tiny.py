"""Tiny models built from configs, and params for fast runs on them."""

from __future__ import annotations

import torch


def build_tiny_dual_encoder(seed: int = 0):
    """A dual encoder with an EfficientNet-lite0 of width 0.25 and a 2-layer BERT of width 32."""
    from transformers import BertConfig

    from vlmprune.models.dual_encoder import DualEncoder, DualEncoderConfig, packaged_tokenizer

    torch.manual_seed(seed)
    tokenizer = packaged_tokenizer()
    text = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    config = DualEncoderConfig(image_overrides={"width_coefficient": 0.25, "image_size": 32},
                               image_size=32, text_config=text.to_dict(), embed_dim=16)
    return DualEncoder(config).eval(), tokenizer


def tiny_params(model_dir, artifacts, **sections):
    """Validated params for a fast run on the tiny dual encoder."""
    from params.schema import validate

    data = {
        "artifacts": str(artifacts),
        "model": {"id": str(model_dir)},
        "calibration": {"n_samples": 16, "batch_size": 8},
        "scoring": {"method": "none", "n_samples": 8, "batch_size": 4},
        "allocation": {"method": "uniform"},
        "evaluation": {"max_samples": 64},
        "tracking": {"uri": f"sqlite:///{artifacts}/mlflow.db", "model_name": "tiny"},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return validate(data)


def family_params(model_id, artifacts, data, **sections):
    """Validated params for a fast run of any family's tiny model on ``data`` (no scoring, uniform Wanda 50%)."""
    from params.schema import validate

    raw = {
        "artifacts": str(artifacts),
        "model": {"id": str(model_id)},
        "data": dict(data),
        "calibration": {"n_samples": 8, "batch_size": 4},
        "scoring": {"method": "none", "n_samples": 4, "batch_size": 4},
        "allocation": {"method": "uniform"},
        "pruning": {"method": "wanda", "sparsity": 0.5},
        "evaluation": {"batch_size": 16, "max_samples": 24},
        "tracking": {"enabled": False},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate(raw)


# ---- tiny models of the Hugging Face families (2 layers, width 32), with offline tokenizers ----

def tiny_text_tokenizer(image_token: bool = False):
    """The packaged MiniLM WordPiece tokenizer (30,522 tokens), plus an ``<image>`` token if asked."""
    from vlmprune.models.dual_encoder import packaged_tokenizer

    tokenizer = packaged_tokenizer()
    if image_token:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def build_tiny_causal_lm(kind: str = "llama", seed: int = 0):
    """A 2-layer LLaMA, OPT or GPT-2 of width 32 over the MiniLM vocabulary."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    torch.manual_seed(seed)
    tokenizer = tiny_text_tokenizer()
    vocab = len(tokenizer)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, bos_token_id=101, eos_token_id=102)
    elif kind == "opt":
        config = OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=256, pad_token_id=0, bos_token_id=101,
                           eos_token_id=102)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=101, eos_token_id=102)
    else:
        raise ValueError(kind)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def build_tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = tiny_text_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    return BertModel(config).eval(), tokenizer


def _tiny_clip_vision(**extra):
    return {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8), **extra}


def build_tiny_clip(seed: int = 0):
    """A CLIPModel (ViT 32x32 / patch 8, text width 32) and a CLIPProcessor with the MiniLM tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_text_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    config = CLIPConfig(text_config=text, vision_config=_tiny_clip_vision(), projection_dim=16)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return CLIPModel(config).eval(), processor


def build_tiny_blip2(seed: int = 0):
    """A BLIP-2 (ViT 32x32, 2-layer Q-Former with 4 queries, 2-layer OPT) and its tokenizer."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    torch.manual_seed(seed)
    tokenizer = tiny_text_tokenizer(image_token=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=0,
                     bos_token_id=101, eos_token_id=102)
    config = Blip2Config(vision_config=_tiny_clip_vision(layer_norm_eps=1e-5),
                         qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, encoder_hidden_size=32, vocab_size=100),
                         text_config=text.to_dict(), num_query_tokens=4, image_token_index=image_token)
    return Blip2ForConditionalGeneration(config).eval(), tokenizer


def build_tiny_llava(seed: int = 0, text_layers: int = 2):
    """A LLaVA (CLIP ViT 32x32 / patch 8 -> 16 image tokens, 2-layer LLaMA) and its tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = tiny_text_tokenizer(image_token=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=101, eos_token_id=102)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**_tiny_clip_vision(num_hidden_layers=3)), text_config=text,
                         image_token_index=image_token, image_seq_length=16, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config).eval(), tokenizer


def save_tiny(model, processor, path):
    """save_pretrained of the model and its tokenizer/processor into ``path`` (what users download)."""
    model.save_pretrained(path)
    processor.save_pretrained(str(path))
    return path


def build_tiny_vision_lm(seed: int = 0):
    """A VisionLM: EfficientNet-lite0 of width 0.25 at 64 px (2x2 map -> 4 visual tokens) -> projector ->
    2-layer LLaMA of width 32 over the MiniLM vocabulary with ``<image>`` as placeholder, [SEP] as EOS."""
    from transformers import LlamaConfig

    from vlmprune.models.vision_lm import VisionLM, VisionLMConfig

    torch.manual_seed(seed)
    tokenizer = tiny_text_tokenizer(image_token=True)
    tokenizer.eos_token = "[SEP]"
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                       bos_token_id=101, eos_token_id=tokenizer.eos_token_id,
                       initializer_range=0.3)  # logits spread enough for a projector to move them
    config = VisionLMConfig(image_overrides={"width_coefficient": 0.25, "image_size": 64}, image_size=64,
                            text_config=text.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    return VisionLM(config).eval(), tokenizer


def interrupt_prune_after(monkeypatch, groups: int, error: type[BaseException]):
    """Make the prune stage raise ``error`` right after its ``groups``-th group checkpoint is written
    (an interruption between two groups); returns a function that puts the real save back."""
    from tasks.resume import ResumeStore

    save = ResumeStore.save

    def save_then_stop(self, group, state):
        save(self, group, state)
        if self.finished == groups:
            raise error

    monkeypatch.setattr(ResumeStore, "save", save_then_stop)
    return lambda: monkeypatch.setattr(ResumeStore, "save", save)
