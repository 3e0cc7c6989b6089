"""Recovery of a structurally pruned student by distillation from its dense teacher.

MoPE-CLIP recovers the pruned model with knowledge distillation from the dense CLIP: logits and
features. Layers are removed, so features are matched at the towers' outputs (the normalised
embeddings), and logits are the image-text similarity matrices of a batch:

    L = w_f * sum_towers mean_i (1 - <s_i, t_i>)                                 (feature term)
      + w_l * T^2 * (KL(p_t(I->T) || p_s(I->T)) + KL(p_t(T->I) || p_s(T->I))) / 2  (logit term)

with s, t the student's and teacher's embeddings, p = softmax(scale * <image, text> / T) over a row
(image -> texts) or a column (text -> images), ``scale`` the teacher's logit scale, T the temperature.

Only the parameters of the pruned towers are trained (AdamW), in eval mode (no dropout, BatchNorm
statistics frozen); the teacher's embeddings are computed once, and a tower that is not trained
(it was not pruned) is taken from the teacher rather than recomputed. A validation split of the pairs
is scored every ``eval_every`` steps; training stops after ``patience`` evaluations without
improvement and the best weights are restored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmprune.structured.towers import logit_scale, structured_towers, tower_embed


@dataclass
class DistillSettings:
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 32
    eval_every: int = 10
    patience: int = 5
    val_fraction: float = 0.2
    feature_weight: float = 1.0
    logit_weight: float = 1.0
    temperature: float = 1.0
    seed: int = 0


def distill_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], scale: float,
                 towers: list[str], settings: DistillSettings) -> torch.Tensor:
    """The loss of the module docstring on one batch of embeddings {"vision": (n, d), "text": (n, d)}."""
    feature = sum((1 - (student[t] * teacher[t]).sum(-1)).mean() for t in towers)
    temp = settings.temperature
    s_logits = scale * student["vision"] @ student["text"].T / temp
    t_logits = scale * teacher["vision"] @ teacher["text"].T / temp
    kl = lambda s, t: F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    logit = (kl(s_logits, t_logits) + kl(s_logits.T, t_logits.T)) / 2 * temp**2
    return settings.feature_weight * feature + settings.logit_weight * logit


def _embed(model: nn.Module, batch: dict, towers: list[str] | None = None) -> dict[str, torch.Tensor]:
    return {t.name: tower_embed(model, t, batch) for t in structured_towers(model, towers)}


def distill(student: nn.Module, teacher: nn.Module, data: dict[str, torch.Tensor], towers: list[str],
            settings: DistillSettings, progress: bool = True) -> dict:
    """Distil ``teacher`` into ``student`` (in place) on ``data`` pairs; returns the history."""
    n = len(data["labels"])
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(n, generator=generator)
    n_val = max(1, round(settings.val_fraction * n))
    if n - n_val < 2:
        raise ValueError(f"distillation needs at least 3 pairs (got {n})")
    val = {k: v[order[:n_val]] for k, v in data.items()}
    train_index = order[n_val:]
    scale = float(logit_scale(teacher).detach())
    with torch.no_grad():
        teacher.eval()
        t_train = _embed(teacher, {k: v[train_index] for k, v in data.items()})
        t_val = _embed(teacher, val)
    train = {k: v[train_index] for k, v in data.items()}

    student.eval()
    trainable = [p for t in structured_towers(student, towers) for p in t.layers.parameters()]
    frozen = [p for p in student.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)

    def student_embed(batch: dict, teacher_emb: dict) -> dict[str, torch.Tensor]:
        """The trained towers' embeddings; an untrained (unpruned) tower equals the teacher's."""
        return {**teacher_emb, **_embed(student, batch, towers)}

    def validate() -> float:
        with torch.no_grad():
            return float(distill_loss(student_embed(val, t_val), t_val, scale, towers, settings))

    best, best_state, best_step, bad = validate(), copy.deepcopy(student.state_dict()), 0, 0
    history = [{"step": 0, "val_loss": best}]
    n_train = len(train_index)
    bar = tqdm(range(1, settings.steps + 1), desc="distil", disable=not progress)
    try:
        for step in bar:
            rows = torch.randint(n_train, (min(settings.batch_size, n_train),), generator=generator)
            batch = {k: v[rows] for k, v in train.items()}
            target = {k: v[rows] for k, v in t_train.items()}
            loss = distill_loss(student_embed(batch, target), target, scale, towers, settings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % settings.eval_every == 0 or step == settings.steps:
                val_loss = validate()
                history.append({"step": step, "train_loss": loss.item(), "val_loss": val_loss})
                bar.set_postfix(val=f"{val_loss:.4f}", best=f"{best:.4f}")
                if val_loss < best:
                    best, best_state, best_step, bad = val_loss, copy.deepcopy(student.state_dict()), step, 0
                else:
                    bad += 1
                    if bad >= settings.patience:
                        break
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
    student.load_state_dict(best_state)
    return {"best_step": best_step, "best_val_loss": best, "initial_val_loss": history[0]["val_loss"],
            "steps_run": history[-1]["step"], "history": history}
