"""Accuracy and measured latency of each operating point, for each policy.

Accuracy is the VQA exact match of :meth:`vlmprune.adapters.blip2.ImageToTextAdapter.evaluate`
(normalised greedy answer in the accepted answers of the class), here with PAR's own generation
loop; ``agreement`` is how often the answer equals the dense model's answer (label-free).

Latency is wall time at batch size 1, the median over ``repeats`` runs (after ``warmup`` runs) of:
``prefill_ms``, from pixels to the first answer token's logits (vision tower, projector, policy and
the pruned prompt pass); ``lm_prefill_ms``, the same without the vision tower and projector; and
``decode_ms``, one generated token through the pruned cache (median over runs of the mean of
``new_tokens`` steps).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmprune.adapters.blip2 import DEFAULT_QUESTION, QUESTIONS, accepted_answers, normalize_answer
from vlmprune.adapters.causal_lm import pad_token_id
from vlmprune.adapters.clip import require_images, tokenizer_of
from vlmprune.data.images import image_split
from vlmprune.data.spec import DataSpec
from vlmprune.par.decoder import Decoder
from vlmprune.par.engine import Plan, decode, generate, prefill


@dataclass
class VQASet:
    """One prompt (1, T) for every image, the images as model inputs, and what counts as right."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    labels: np.ndarray
    accepted: list[set[str]]
    max_new_tokens: int
    pad_token_id: int
    tokenizer: object


def vqa_set(adapter, loaded, spec: DataSpec, split: str, max_samples: int | None = None, seed: int = 0) -> VQASet:
    """The adapter's VQA prompt over the ``split`` ("train" or "test") images of ``spec``; a seeded
    sample of ``max_samples`` of the training split, the first ``max_samples`` of the test split."""
    require_images(spec, adapter.family)
    data, train, test = image_split(spec)
    if data.has_questions:
        raise NotImplementedError(f"PAR asks one fixed question per image and scores class names; {spec.name} has "
                                  "per-example questions (data.question_column), which PAR does not support yet")
    if split == "train":
        index = np.random.default_rng(seed).permutation(train)[:max_samples]
    else:
        index = test[:max_samples] if max_samples else test
    prompt = adapter.question_prompt(QUESTIONS.get(spec.name, DEFAULT_QUESTION))
    ids = torch.tensor([adapter.prompt_ids(loaded, prompt)])
    max_new = max(len(adapter._answer_ids(loaded, prompt, a)) for a in data.class_names) + 1
    tokenizer = tokenizer_of(loaded.processor)
    return VQASet(ids, adapter._pixels(loaded, data.images[index]), data.labels[index],
                  accepted_answers(spec.name, data.class_names), max_new, pad_token_id(tokenizer), tokenizer)


@torch.no_grad()
def answers(dec: Decoder, data: VQASet, plan: Plan, policy, batch_size: int, device: str = "cpu") -> list[str]:
    out = []
    for start in range(0, len(data.labels), batch_size):
        pixels = data.pixel_values[start:start + batch_size].to(device)
        ids = data.input_ids.to(device).expand(pixels.shape[0], -1)
        tokens = generate(dec, ids, pixels, plan, policy, data.max_new_tokens, data.pad_token_id)
        out += data.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return out


def accuracy(texts: list[str], data: VQASet) -> float:
    return float(np.mean([normalize_answer(t) in data.accepted[y] for t, y in zip(texts, data.labels)]))


def agreement(texts: list[str], dense: list[str]) -> float:
    return float(np.mean([normalize_answer(a) == normalize_answer(b) for a, b in zip(texts, dense)]))


@torch.no_grad()
def latency(dec: Decoder, data: VQASet, plan: Plan, policy, repeats: int = 10, warmup: int = 2,
            new_tokens: int = 4, device: str = "cpu") -> dict[str, float]:
    """Median milliseconds at batch size 1 (see the module docstring); image ``i % n`` on run ``i``."""
    prefill_s, lm_s, decode_s = [], [], []
    ids = data.input_ids.to(device)
    mask = dec.visual_mask(ids)

    def clock() -> float:  # CUDA runs asynchronously: wait for the queued work before reading the clock
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        return time.perf_counter()

    for run in range(warmup + repeats):
        pixels = data.pixel_values[run % len(data.labels)][None].to(device)
        t0 = clock()
        embeds = dec.embed_inputs(ids, pixels)
        t1 = clock()
        logits, cache = prefill(dec, embeds, mask, plan, policy)
        t2 = clock()
        token = logits.argmax(-1)
        for _ in range(new_tokens):
            token = decode(dec, token, cache).argmax(-1)
        t3 = clock()
        if run >= warmup:
            prefill_s.append(t2 - t0)
            lm_s.append(t2 - t1)
            decode_s.append((t3 - t2) / new_tokens)
    return {name: 1000 * statistics.median(values)
            for name, values in (("prefill_ms", prefill_s), ("lm_prefill_ms", lm_s), ("decode_ms", decode_s))}


def evaluate_grid(dec: Decoder, data: VQASet, policies: dict, points: list[tuple[float, float]], k: int,
                  batch_size: int = 32, repeats: int = 10, device: str = "cpu", progress: bool = False) -> list[dict]:
    """One row per (policy, operating point): accuracy, agreement with dense, latencies and speed-ups
    relative to the dense row (the dense point is measured once, with no policy)."""
    dense_plan = Plan(1.0, 1.0, k)
    dense_text = answers(dec, data, dense_plan, None, batch_size, device)
    dense = {"method": "dense", "token_ratio": 1.0, "layer_ratio": 1.0, "accuracy": accuracy(dense_text, data),
             "agreement": 1.0, **latency(dec, data, dense_plan, None, repeats, device=device)}
    rows = [dense]
    jobs = [(name, p) for name, p in policies.items() for p in points if p != (1.0, 1.0)]
    for name, (token_ratio, layer_ratio) in tqdm(jobs, desc="operating points", disable=not progress):
        plan = Plan(token_ratio, layer_ratio, k)
        text = answers(dec, data, plan, policies[name], batch_size, device)
        rows.append({"method": name, "token_ratio": token_ratio, "layer_ratio": layer_ratio,
                     "accuracy": accuracy(text, data), "agreement": agreement(text, dense_text),
                     **latency(dec, data, plan, policies[name], repeats, device=device)})
    for row in rows:
        row["prefill_speedup"] = dense["prefill_ms"] / row["prefill_ms"]
        row["lm_prefill_speedup"] = dense["lm_prefill_ms"] / row["lm_prefill_ms"]
        row["decode_speedup"] = dense["decode_ms"] / row["decode_ms"]
    return rows
