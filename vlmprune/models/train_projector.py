"""Train the projector of :class:`~vlmprune.models.vision_lm.VisionLM` with the vision tower and the
language model frozen (LLaVA's first stage, "feature alignment"; Liu et al. 2023).

Task: visual question answering on a labelled image set: the dataset's question after the visual
tokens, the class name as the answer (sequences from
:meth:`vlmprune.adapters.vision_lm.VisionLMAdapter.qa_sequences`, the ones evaluation scores).
Loss: teacher-forced next-token cross-entropy on the answer tokens only,
L = -(1/|A|) sum_{t in A} log p(y_t | y_<t, image), A = the answer tokens and the EOS after them.

Cost on a CPU: the frozen visual tokens are computed once per training image and cached; each step
runs the language model on ``batch_size`` sequences (visual tokens + question + answer) forward and
backward (gradients flow to the projector only), and the LM head only at the answer positions.
Optimiser: AdamW on the projector, linear warm-up over the first 5% of the steps, then cosine
decay to zero (LLaVA's schedule).

Training for token pruning (``token_drop > 0``): on that fraction of the steps, drawn with the seed,
the loss is taken on the token-dropped model instead, as PAR runs it
(:func:`vlmprune.par.engine.dropped_forward`): layers ``0 .. drop_k-1`` on every token, then
``floor(n r)`` visual tokens kept, a uniformly random set per example, with ``r`` drawn from
``drop_ratios`` per step. The language model stays frozen; what changes is that the projector learns
visual tokens whose content survives the dropping of others, while the other steps keep the dense
loss. Measured on the 196-token model (``benchmarks/results/many_tokens.md``): with half the steps
dropped and twice the steps, dense accuracy rose (0.944 to 0.972) and 50% of the tokens lost 0.7
points instead of 3.9; with the same number of steps the dense model fell to 0.870. Random sets
rather than a router's, so that the projector does not depend on one policy; the same idea as
training a vision-language model at several token budgets (Cai et al., "Matryoshka Multimodal
Models", 2024), here on the projector alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmprune.data.images import ImageDataset, to_pixel_values
from vlmprune.models.vision_lm import VisionLM


@dataclass
class ProjectorTrainingResult:
    final_loss: float  # mean loss over the last tenth of the steps
    steps: int
    losses: list[float] = field(default_factory=list)  # one per step


@torch.no_grad()
def cache_image_features(model: VisionLM, images, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Frozen visual tokens (n, n_image_tokens, channels) of uint8 greyscale ``images``."""
    model.vision.eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="visual tokens", leave=False, disable=not progress):
        pixels = to_pixel_values(images[start:start + batch_size], model.config.image_size)
        chunks.append(model.image_features(pixels.to(model.projector[0].weight.dtype)))
    return torch.cat(chunks)


def answer_loss(model: VisionLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy at the labelled positions (labels != -100), from cached visual tokens.

    Equal to ``lm_loss(model(...).logits, labels)``, with the LM head applied only where a label is read.
    """
    embeds = model.merge_image_embeds(input_ids, model.projector(features))
    hidden = model.language_model.model(inputs_embeds=embeds, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
    return _labelled_loss(model, hidden, labels)


def dropped_answer_loss(model: VisionLM, input_ids: torch.Tensor, labels: torch.Tensor, features: torch.Tensor,
                        keep_ratio: float, k: int, generator: torch.Generator) -> torch.Tensor:
    """:func:`answer_loss` of the token-dropped model: after layer ``k``, ``floor(n keep_ratio)`` of the
    ``n`` visual tokens kept, a uniformly random set per example drawn with ``generator``. Sequences
    must be right-padded (the padding then never reaches a labelled position under causal attention,
    so no attention mask is needed)."""
    from vlmprune.par.decoder import decoder_of
    from vlmprune.par.engine import check_batch, dropped_forward, keep_count

    dec = decoder_of(model)
    embeds = model.merge_image_embeds(input_ids, model.projector(features))
    visual = dec.visual_mask(input_ids)
    n = check_batch(visual)
    scores = torch.rand(input_ids.shape[0], n, generator=generator)
    hidden, kept = dropped_forward(dec, embeds, visual, k, scores, keep_count(n, keep_ratio))
    return _labelled_loss(model, dec.norm(hidden), labels.gather(1, kept))


def _labelled_loss(model: VisionLM, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next token at each position whose next label is not -100, from the final
    (normed) hidden states; the LM head runs at those positions only."""
    targets = labels[:, 1:]
    scored = targets != -100
    logits = model.language_model.lm_head(hidden[:, :-1][scored])
    return F.cross_entropy(logits.float(), targets[scored])


def _warmup_cosine(steps: int):
    warmup = max(1, round(0.05 * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def train_projector(model: VisionLM, tokenizer, data: ImageDataset, steps: int = 200, batch_size: int = 16,
                    lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, reinit: bool = True,
                    token_drop: float = 0.0, drop_ratios: tuple[float, ...] = (0.5, 0.25), drop_k: int = 2,
                    progress: bool = True) -> ProjectorTrainingResult:
    """Fit ``model.projector`` on ``data`` (training images only); the vision tower and the language
    model are left untouched. The projector is re-initialised from ``seed`` first (``reinit=False``:
    it goes on from its current weights, a warm start), and batches, dropped steps and kept tokens are
    drawn with ``seed``, so the result depends only on the frozen parts, the starting projector, the
    data and the seed. ``token_drop``, ``drop_ratios``, ``drop_k``: training for token pruning (module
    docstring); ``token_drop=0`` never drops and draws nothing for it."""
    from vlmprune.adapters.base import LoadedModel
    from vlmprune.adapters.vision_lm import VisionLMAdapter

    if data.has_questions:
        raise NotImplementedError("the projector is trained to name the class of each image; training it on "
                                  "per-example questions (data.question_column) is not built: use a labelled set")
    if not 0 <= token_drop <= 1:
        raise ValueError(f"token_drop {token_drop} is not a fraction of the steps in [0, 1]")
    if token_drop and not drop_ratios:
        raise ValueError("token_drop > 0 needs at least one keep ratio in drop_ratios")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if reinit:
        for layer in model.projector:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    frozen = [p for name, p in model.named_parameters() if not name.startswith("projector.") and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    try:
        features = cache_image_features(model, data.images, progress=progress)
        # every example shares the prompt: one padded row per class, picked by label
        rows = VisionLMAdapter().qa_sequences(LoadedModel(model, tokenizer), data.name, data.class_names)
        labels = torch.from_numpy(data.labels)
        optimizer = torch.optim.AdamW(model.projector.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
        losses = []
        bar = tqdm(range(steps), desc="train projector", leave=False, disable=not progress)
        for _ in bar:
            index = torch.randint(len(labels), (batch_size,), generator=generator)
            y = labels[index]
            ids, mask, targets = rows["input_ids"][y], rows["attention_mask"][y], rows["labels"][y]
            if token_drop and float(torch.rand((), generator=generator)) < token_drop:
                ratio = drop_ratios[int(torch.randint(len(drop_ratios), (), generator=generator))]
                loss = dropped_answer_loss(model, ids, targets, features[index], ratio, drop_k, generator)
            else:
                loss = answer_loss(model, ids, mask, targets, features[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    tail = losses[-max(1, steps // 10):]
    return ProjectorTrainingResult(final_loss=sum(tail) / len(tail), steps=steps, losses=losses)
