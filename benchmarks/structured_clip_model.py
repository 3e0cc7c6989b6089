"""A tiny CLIP (``CLIPModel`` built from a config) trained from scratch on the digits, offline.

No CLIP checkpoint is available offline, so the structured-pruning benchmark of the ``clip`` family
(:mod:`benchmarks.structured_clip`) trains its own: a ViT on ``image_size`` px digits cut into
``patch`` px patches, and CLIP's causal text transformer over the packaged MiniLM WordPiece
vocabulary (the tokenizer tests/tiny.py gives its tiny CLIPs), both ``layers`` deep, ``hidden``
wide with ``heads`` heads and an FFN of 4 x ``hidden``, projected to ``embed_dim``.

Training (Radford et al. 2021, with multi-positive targets because many images of a batch share a
class): logits_ij = exp(t) <f_i, g_j> between the normalised image and caption embeddings of a batch,
loss = :func:`vlmprune.models.train_heads.multi_positive_contrastive_loss` (targets
P_ij = 1[y_i = y_j] / #{k: y_k = y_i}, symmetric soft cross-entropy), t clamped to log 100 as in
CLIP. Batches of ``batch_size`` images of the digits training split, each with a caption from a
training template drawn per image and step; images shifted by up to ``shift`` pixels (at the model's
resolution, edges replicated). AdamW (weight decay 0.05), linear warm-up over the first 10% of the
steps, then cosine decay to 0. Seeded: the same seed and sizes give the same weights.

The model is saved with ``save_pretrained`` beside a ``CLIPProcessor`` (CLIP's image statistics, the
MiniLM tokenizer), so the ``clip`` adapter loads it from the directory, and it is evaluated through
that adapter (held-out images, evaluation-only templates).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmprune.adapters.clip import CLIPAdapter, features, image_stats, pixel_values
from vlmprune.data.images import image_split
from vlmprune.data.spec import DataSpec
from vlmprune.models.train_heads import multi_positive_contrastive_loss


@dataclass
class TinyClipSize:
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    image_size: int = 16
    patch: int = 8
    embed_dim: int = 64
    max_text_len: int = 32


def build_tiny_clip(size: TinyClipSize, seed: int = 0):
    """A randomly initialised ``CLIPModel`` of ``size`` and its ``CLIPProcessor``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from vlmprune.models.dual_encoder import packaged_tokenizer

    torch.manual_seed(seed)
    tokenizer = packaged_tokenizer()
    tower = {"hidden_size": size.hidden, "intermediate_size": 4 * size.hidden, "num_hidden_layers": size.layers,
             "num_attention_heads": size.heads}
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=size.max_text_len, pad_token_id=0,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = dict(tower, image_size=size.image_size, patch_size=size.patch)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=size.embed_dim)
    pixels = {"height": size.image_size, "width": size.image_size}
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size.image_size},
                                                                 crop_size=pixels),
                              tokenizer=tokenizer)
    return CLIPModel(config), processor


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (n, c, h, w) moved by its own (dy, dx) in [-shift, shift]^2, edges replicated."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    offsets = torch.randint(2 * shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train_tiny_clip(model, processor, steps: int, batch_size: int = 128, lr: float = 1e-3, shift: int = 2,
                    seed: int = 0, spec: DataSpec | None = None, progress: bool = True) -> dict:
    """Train ``model`` in place as the module docstring says; returns the last loss, the loss every tenth of
    the steps and the time taken."""
    spec = spec or DataSpec(name="digits")
    data, train, _ = image_split(spec)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images = pixel_values(data.images[train], model.config.vision_config.image_size, *image_stats(processor))
    labels = torch.from_numpy(data.labels[train])
    n_templates = len(data.train_templates)
    captions = [t.format(c) for c in data.class_names for t in data.train_templates]
    tokens = processor.tokenizer(captions, padding=True, truncation=True,
                                 max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    model.train()
    start, loss, history = time.perf_counter(), torch.tensor(float("nan")), []
    for step in tqdm(range(1, steps + 1), desc="train tiny CLIP", disable=not progress):
        rows = torch.randperm(len(labels), generator=generator)[:batch_size]
        y = labels[rows]
        caption = y * n_templates + torch.randint(n_templates, (len(rows),), generator=generator)
        img = F.normalize(features(model.get_image_features(
            pixel_values=random_shift(images[rows], shift, generator))), dim=-1)
        txt = F.normalize(features(model.get_text_features(input_ids=tokens["input_ids"][caption],
                                                           attention_mask=tokens["attention_mask"][caption])), dim=-1)
        logits = model.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
        loss = multi_positive_contrastive_loss(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 10) == 0:
            history.append((step, round(loss.item(), 4)))
    model.eval()
    return {"final_loss": loss.item(), "train_s": time.perf_counter() - start, "loss_history": history}


def make_tiny_clip(directory: str | Path, steps: int, size: TinyClipSize | None = None, seed: int = 0,
                   batch_size: int = 128, lr: float = 1e-3, progress: bool = True) -> dict:
    """Build, train and save a tiny CLIP in ``directory``; evaluate it through the ``clip`` adapter.

    Returns (and writes to ``directory/training.json``) the sizes, the training settings and time,
    and the held-out metrics (zero-shot accuracy, retrieval R@1/R@5).
    """
    size = size or TinyClipSize()
    model, processor = build_tiny_clip(size, seed)
    trained = train_tiny_clip(model, processor, steps, batch_size, lr, seed=seed, progress=progress)
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(str(directory))
    adapter = CLIPAdapter()
    loaded = adapter.load(str(directory), torch.float32, "cpu")
    metrics, _ = adapter.evaluate(loaded, DataSpec(name="digits"), 128, None, "cpu")
    record = {"size": asdict(size), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, **trained,
              "metrics": metrics}
    (directory / "training.json").write_text(json.dumps(record, indent=2))
    return record
