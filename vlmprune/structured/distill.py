"""Recovery of a structurally pruned student by distillation from its dense teacher.

MoPE-CLIP (Lin et al. 2024, seed 002) recovers the pruned model with knowledge distillation from
the dense model, on features and logits. One training loop (:func:`fit`: AdamW, a validation split,
early stopping, best weights restored) serves two family-specific losses.

**Image-text families** (dual encoder, CLIP). Layers are removed, so features are matched at the
towers' outputs (the normalised embeddings), and logits are the image-text similarity matrices of a
batch:

    L = w_f * sum_towers mean_i (1 - <s_i, t_i>)                                 (feature term)
      + w_l * T^2 * (KL(p_t(I->T) || p_s(I->T)) + KL(p_t(T->I) || p_s(T->I))) / 2  (logit term)

with s, t the student's and teacher's embeddings, p = softmax(scale * <image, text> / T) over a row
(image -> texts) or a column (text -> images), ``scale`` the teacher's logit scale, T the temperature.
Only the parameters of the pruned towers are trained; the teacher's embeddings are computed once,
and a tower that is not trained (it was not pruned) is taken from the teacher.

**Causal LMs** (LLaMA-style; windows of training text). Logit distillation (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network") on every position's next-token distribution, plus
feature distillation on the hidden states of the layers the student kept (MoPE-CLIP distils features
and logits):

    L = w_l * T^2 * (1 / #tokens) * sum_tokens KL(softmax(z_t / T) || softmax(z_s / T))
      + w_f * sum_{kept layers l} MSE(h_s^l, h_t^{map(l)}) / MS(h_t^{map(l)})

with z the logits over the vocabulary, h^l the output (residual stream, before the final norm) of
decoder layer l, map(l) the index in the dense teacher of the layer the student's l-th layer came
from (:func:`~vlmprune.structured.surgery.parent_indices`; width pruning keeps the hidden size, so
the shapes match), MSE the mean over tokens and hidden units and MS(h) the teacher's mean square
on the batch (no gradient). The T^2 keeps the gradient scale of the soft targets independent of T
(Hinton et al.). Dividing by MS makes each layer's term a relative error: the residual stream's
scale varies by three orders of magnitude across layers (SmolLM2-135M on Wikipedia: mean square
4.6 after layer 0, ~8,500 after layers 11-27, where a few massive activations dominate), so the
plain MSE sum (~5e4 for an evenly layer-dropped 24/30-layer student, against a KL of 2.8) would drown the logit term.

All of the student's remaining weights train (embeddings, norms, decoder layers, LM head); the
teacher runs in eval mode without gradients, on each batch as it comes (its logits over the
vocabulary are too large to cache).

Both: the student trains in eval mode (no dropout, BatchNorm statistics frozen). A validation split
(``val_fraction`` of the examples) is scored every ``eval_every`` steps; training stops after
``patience`` evaluations without improvement and the best weights are restored.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmprune.structured.surgery import parent_indices
from vlmprune.structured.towers import is_causal_lm, layer_output, logit_scale, structured_towers, tower_embed


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


# ---- the training loop shared by the families ---------------------------------------------------

def split(n: int, settings: DistillSettings, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, training) indices: a seeded permutation, its first ``round(val_fraction * n)`` (>= 1) rows
    for validation."""
    order = torch.randperm(n, generator=generator)
    n_val = max(1, round(settings.val_fraction * n))
    if n - n_val < 2:
        raise ValueError(f"distillation needs at least 3 examples (got {n})")
    return order[:n_val], order[n_val:]


def fit(student: nn.Module, trainable: list[nn.Parameter], n_train: int,
        train_loss: Callable[[torch.Tensor], torch.Tensor], validate: Callable[[], float], settings: DistillSettings,
        generator: torch.Generator, progress: bool = True, desc: str = "distil") -> dict:
    """Train ``trainable`` (AdamW, no weight decay) on ``train_loss(rows)`` for batches of rows drawn with
    replacement from ``range(n_train)``; ``validate()`` every ``eval_every`` steps and at the last step; stop after
    ``patience`` validations without improvement; restore the best weights. Other parameters are frozen during
    training and unfrozen afterwards. Returns the history."""
    student.eval()
    frozen = [p for p in student.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    best, best_state, best_step, bad = validate(), copy.deepcopy(student.state_dict()), 0, 0
    history = [{"step": 0, "val_loss": best}]
    bar = tqdm(range(1, settings.steps + 1), desc=desc, disable=not progress)
    try:
        for step in bar:
            rows = torch.randint(n_train, (min(settings.batch_size, n_train),), generator=generator)
            loss = train_loss(rows)
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


def distill(student: nn.Module, teacher: nn.Module, data: dict[str, torch.Tensor], towers: list[str],
            settings: DistillSettings, progress: bool = True) -> dict:
    """Distil ``teacher`` into ``student`` (in place) on ``data``: image-text pairs, or for a causal LM windows
    (``input_ids``, ``attention_mask``; ``towers`` is then unused: the whole student trains). Returns the history."""
    if is_causal_lm(student):
        return distill_causal_lm(student, teacher, data, settings, progress)
    return distill_image_text(student, teacher, data, towers, settings, progress)


# ---- image-text families --------------------------------------------------------------------------

def distill_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], scale: float,
                 towers: list[str], settings: DistillSettings) -> torch.Tensor:
    """The image-text loss of the module docstring on one batch of embeddings {"vision": (n, d), "text": (n, d)}."""
    feature = sum((1 - (student[t] * teacher[t]).sum(-1)).mean() for t in towers)
    temp = settings.temperature
    s_logits = scale * student["vision"] @ student["text"].T / temp
    t_logits = scale * teacher["vision"] @ teacher["text"].T / temp
    kl = lambda s, t: F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    logit = (kl(s_logits, t_logits) + kl(s_logits.T, t_logits.T)) / 2 * temp**2
    return settings.feature_weight * feature + settings.logit_weight * logit


def _embed(model: nn.Module, batch: dict, towers: list[str] | None = None) -> dict[str, torch.Tensor]:
    return {t.name: tower_embed(model, t, batch) for t in structured_towers(model, towers)}


def distill_image_text(student: nn.Module, teacher: nn.Module, data: dict[str, torch.Tensor], towers: list[str],
                       settings: DistillSettings, progress: bool = True) -> dict:
    """Distil the pruned ``towers`` of an image-text student on ``data`` pairs (the module docstring)."""
    generator = torch.Generator().manual_seed(settings.seed)
    val_index, train_index = split(len(data["labels"]), settings, generator)
    val = {k: v[val_index] for k, v in data.items()}
    train = {k: v[train_index] for k, v in data.items()}
    scale = float(logit_scale(teacher).detach())
    with torch.no_grad():
        teacher.eval()
        t_train = _embed(teacher, train)
        t_val = _embed(teacher, val)

    def student_embed(batch: dict, teacher_emb: dict) -> dict[str, torch.Tensor]:
        """The trained towers' embeddings; an untrained (unpruned) tower equals the teacher's."""
        return {**teacher_emb, **_embed(student, batch, towers)}

    def validate() -> float:
        with torch.no_grad():
            return float(distill_loss(student_embed(val, t_val), t_val, scale, towers, settings))

    def train_loss(rows: torch.Tensor) -> torch.Tensor:
        target = {k: v[rows] for k, v in t_train.items()}
        return distill_loss(student_embed({k: v[rows] for k, v in train.items()}, target), target, scale, towers,
                            settings)

    trainable = [p for t in structured_towers(student, towers) for p in t.layers.parameters()]
    return fit(student, trainable, len(train_index), train_loss, validate, settings, generator, progress)


# ---- causal LMs -------------------------------------------------------------------------------------

def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over tokens of KL(softmax(z_t / T) || softmax(z_s / T)); logits (..., vocabulary), ``mask``
    (...) of 1 for the tokens that count (Hinton et al. 2015)."""
    log_s = F.log_softmax(student_logits.float() / temperature, -1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    return temperature**2 * _masked_mean(per_token, mask)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens where ``mask`` (batch, tokens) is 1 of ``values`` (batch, tokens[, hidden]; a hidden
    dimension is averaged first)."""
    if values.dim() == 3:
        values = values.mean(-1)
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE(h_s, h_t) / MS(h_t) over the masked tokens of (batch, tokens, hidden) states; the denominator carries
    no gradient."""
    teacher = teacher.float().detach()
    return _masked_mean((student.float() - teacher) ** 2, mask) / _masked_mean(teacher**2, mask).clamp(min=1e-12)


@contextlib.contextmanager
def _layer_outputs(layers: nn.ModuleList):
    """Collect each layer's output (hidden states) during the forwards run inside the block."""
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _, args, out: outputs.append(layer_output(out))) for layer in layers]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


def _lm_forward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, hidden states after each decoder layer) of one batch of windows."""
    (tower,) = structured_towers(model)
    with _layer_outputs(tower.layers) as hidden:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
    return logits, list(hidden)


def layer_map(student: nn.Module, teacher: nn.Module) -> list[int]:
    """For each of the student's decoder layers, the position in the teacher of the layer it came from."""
    (s_tower,), (t_tower,) = structured_towers(student), structured_towers(teacher)
    position = {parent: i for i, parent in enumerate(parent_indices(t_tower))}
    parents = parent_indices(s_tower)
    missing = [p for p in parents if p not in position]
    if missing:
        raise ValueError(f"the student's layers {missing} (parent indices) are not in the teacher")
    return [position[p] for p in parents]


def lm_distill_loss(student_out: tuple[torch.Tensor, list[torch.Tensor]],
                    teacher_out: tuple[torch.Tensor, list[torch.Tensor]], mapping: list[int],
                    mask: torch.Tensor | None, settings: DistillSettings) -> torch.Tensor:
    """The causal-LM loss of the module docstring from (logits, per-layer hidden states) of student and teacher;
    ``mapping[l]``: the teacher layer of the student's layer l."""
    (s_logits, s_hidden), (t_logits, t_hidden) = student_out, teacher_out
    loss = settings.logit_weight * token_kl(s_logits, t_logits, settings.temperature, mask)
    if settings.feature_weight:
        feature = sum(relative_mse(h, t_hidden[m], mask) for h, m in zip(s_hidden, mapping))
        loss = loss + settings.feature_weight * feature
    return loss


def _lm_problem(student: nn.Module, teacher: nn.Module, data: dict[str, torch.Tensor], settings: DistillSettings):
    """The split of the windows and the two losses of :func:`distill_causal_lm`: (generator, training indices,
    loss of training rows, validation loss)."""
    ids = data["input_ids"]
    mask = data.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    generator = torch.Generator().manual_seed(settings.seed)
    val_index, train_index = split(len(ids), settings, generator)
    mapping = layer_map(student, teacher)
    teacher.eval()

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": ids[rows], "attention_mask": mask[rows]}
        with torch.no_grad():
            target = _lm_forward(teacher, batch)
        return lm_distill_loss(_lm_forward(student, batch), target, mapping, batch["attention_mask"], settings)

    def validate() -> float:
        """Token-weighted mean of the loss over the validation windows, ``batch_size`` windows at a time."""
        total, tokens = 0.0, 0.0
        with torch.no_grad():
            for s in range(0, len(val_index), settings.batch_size):
                rows = val_index[s:s + settings.batch_size]
                n = float(mask[rows].sum())
                total += float(batch_loss(rows)) * n
                tokens += n
        return total / max(tokens, 1.0)

    return generator, train_index, lambda rows: batch_loss(train_index[rows]), validate


def distill_causal_lm(student: nn.Module, teacher: nn.Module, data: dict[str, torch.Tensor],
                      settings: DistillSettings, progress: bool = True) -> dict:
    """Distil a dense causal LM into its structurally pruned ``student`` (in place) on windows ``data``
    (``input_ids``, optional ``attention_mask``): the causal-LM loss of the module docstring, all of the student's
    weights trained. Returns the history."""
    generator, train_index, train_loss, validate = _lm_problem(student, teacher, data, settings)
    return fit(student, list(student.parameters()), len(train_index), train_loss, validate, settings, generator,
               progress)


def validation_loss(student: nn.Module, teacher: nn.Module, data: dict[str, torch.Tensor],
                    settings: DistillSettings) -> float:
    """The validation loss that :func:`distill_causal_lm` computes for ``student`` on ``data`` (same split, same
    batches), without training: e.g. to check that a saved student is the best one."""
    return _lm_problem(student, teacher, data, settings)[3]()
