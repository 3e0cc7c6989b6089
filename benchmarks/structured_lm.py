"""Structured pruning of SmolLM2-135M (``model.id: smollm2``): MoPE with the LM loss vs magnitude vs
layer drop (issue #6, generative models).

For each (method, width ratio, depth ratio): perplexity on held-out Wikipedia windows (the evaluate
stage's evaluator), parameters (whole model and decoder layers), and measured CPU latency of a
prefill of ``--prefill`` tokens (``use_cache=True``, logits of the last position only, as in
``generate``; median of ``--repeats`` runs after one warm-up, batch 1 and 8, fixed thread count).
No distillation.

MoPE scores come from :class:`vlmprune.structured.mope_lm.LMMoPEScorer` on ``--score-windows``
calibration windows of ``--score-len`` tokens (training split). Width scores (head units, FFN
groups) and layer scores are computed once on the dense model and reused by every ratio (the
numbers ``structured_prune`` computes for a width-only or depth-only run); their forward passes and
wall time are reported. Width and depth are not combined here (that would need the layer scores of
each narrowed model).

    python -m benchmarks.structured_lm                       # writes benchmarks/results/structured_lm.md

Latencies on a shared, loaded machine are noisy: compare rows of one run only.

Distillation (``--distill-steps N``, N > 0): instead of the grid, prune each of ``--distill-configs``
(``method:width:depth``; MoPE scores on the same calibration windows), measure perplexity, distil the
pruned student from the dense model for up to N steps
(:func:`vlmprune.structured.distill.distill_causal_lm`: next-token KL + hidden-state MSE of the
kept layers, all weights trained, early stopping on held-out distillation windows) on
``--distill-windows`` training-split windows of ``--distill-len`` tokens, batches of
``--distill-batch``, and measure perplexity again; the rows are appended to ``--out`` (a section)
and written to ``<out>_distill.json``.

    python -m benchmarks.structured_lm --distill-steps 50 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table, shell_command
from vlmprune.adapters.base import LoadedModel
from vlmprune.adapters.causal_lm import CausalLMAdapter
from vlmprune.data.spec import DataSpec
from vlmprune.data.text import calibration_windows
from vlmprune.structured import StructuredSettings, count_parameters, structured_prune
from vlmprune.structured.distill import DistillSettings, distill_causal_lm
from vlmprune.structured.magnitude import MagnitudeScorer
from vlmprune.structured.mope_lm import LMMoPEScorer
from vlmprune.structured.plan import prune_depth, prune_width
from vlmprune.structured.surgery import apply_structure, current_structure, tag_parent_indices
from vlmprune.structured.towers import structured_towers

GRID = [  # (method, width_ratio, depth_ratio), depth first: its MoPE scores are the cheapest
    ("mope", 1.0, 0.8), ("magnitude_structured", 1.0, 0.8), ("layer_drop", 1.0, 0.8),
    ("mope", 0.67, 1.0), ("magnitude_structured", 0.67, 1.0),
    ("mope", 1.0, 0.6), ("magnitude_structured", 1.0, 0.6), ("layer_drop", 1.0, 0.6),
    ("mope", 0.33, 1.0), ("magnitude_structured", 0.33, 1.0),
]


class CachedScores:
    """A scorer whose width and layer scores were computed once on the dense model."""

    def __init__(self, scorer, dense_tower):
        self.scorer, self.tower, self.cost = scorer, dense_tower, scorer.cost
        self._cache: dict = {}
        self.seconds = {"width": 0.0, "layers": 0.0}

    def refresh(self) -> None:  # only used on unpruned (depth-only) copies
        pass

    def _timed_once(self, name: str, clock: str, score):
        """``score()`` on the first call for ``name``, its time added to ``seconds[clock]``; the cached result after."""
        if name not in self._cache:
            start = time.perf_counter()
            self._cache[name] = score()
            self.seconds[clock] += time.perf_counter() - start
        return self._cache[name]

    def heads(self, tower):
        return self._timed_once("heads", "width", lambda: self.scorer.heads(self.tower))

    def width(self, tower, groups):
        return self._timed_once("width", "width", lambda: self.scorer.width(self.tower, groups))

    def layers(self, tower):
        return self._timed_once("layers", "layers", lambda: self.scorer.layers(self.tower))


@torch.no_grad()
def prefill_latency(model, batch: int, length: int, repeats: int) -> float:
    """Median seconds of one prefill (after one warm-up run)."""
    ids = torch.randint(100, 40000, (batch, length), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


COLUMNS = ["method", "width", "depth", "layers", "params (M)", "layer params (M)", "perplexity", "latency b1 (ms)",
           "latency b8 (ms)", "speedup b1", "speedup b8", "scoring (s)"]


@torch.no_grad()
def interleaved_latency(models: list, length: int, rounds: int) -> list[dict]:
    """Median prefill seconds per model at batch 1 and 8, measured in ``rounds`` rounds that each time
    every model once (after one warm-up round), so that a change of machine load hits all rows alike."""
    ids = {b: torch.randint(100, 40000, (b, length), generator=torch.Generator().manual_seed(0)) for b in (1, 8)}
    times = [{1: [], 8: []} for _ in models]
    for r in range(rounds + 1):
        for i, model in enumerate(models):
            for b in (1, 8):
                start = time.perf_counter()
                model(input_ids=ids[b], use_cache=True, logits_to_keep=1)
                if r:
                    times[i][b].append(time.perf_counter() - start)
    return [{b: statistics.median(t[b]) for b in (1, 8)} for t in times]


def relatency(args, command: str) -> None:
    """Re-measure the latency columns of a finished run (``<out>.json``) in interleaved rounds. Latency
    depends on the shapes only, so each row's structure is cut from the dense model."""
    import re

    from vlmprune.structured.surgery import apply_structure

    raw = json.loads(Path(args.out).with_suffix(".json").read_text())
    dense = CausalLMAdapter().load("smollm2", torch.float32, "cpu").model
    models = [apply_structure(copy.deepcopy(dense), {"language": r["structure"]}) for r in raw]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured = interleaved_latency(models, args.prefill, args.repeats)
    for r, m in zip(raw, measured, strict=True):
        r["latency b1 (ms)"], r["latency b8 (ms)"] = 1000 * m[1], 1000 * m[8]
        r["speedup b1"], r["speedup b8"] = measured[0][1] / m[1], measured[0][8] / m[8]
    Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1))
    text = Path(args.out).read_text()
    table = markdown_table(raw, COLUMNS)
    text = re.sub(r"(^\|.*\|\n)+", table + "\n", text, count=1, flags=re.M)
    text += (f"\nLatency columns re-measured {started} with `{command}`: {args.repeats} interleaved rounds (every "
             f"row once per round, after a warm-up round; median), {args.threads} thread(s), same prefill. The "
             "first pass timed each row right after pruning it, and the machine's load (other jobs) fell from ~8 "
             "to ~0.5 during the run, which made its later rows look faster than they were.\n")
    Path(args.out).write_text(text)


DISTILL_COLUMNS = ["method", "width", "depth", "layers", "params (M)", "perplexity before", "perplexity after",
                   "steps run", "best step", "val loss before", "val loss best", "distill (s)"]


def distill_terms(student, teacher, data: dict, settings: DistillSettings) -> dict:
    """The logit (KL) and feature (MSE) terms of the distillation loss on the first ``batch_size`` windows."""
    from vlmprune.structured.distill import _lm_forward, layer_map, lm_distill_loss

    batch = {k: v[:settings.batch_size] for k, v in data.items()}
    with torch.no_grad():
        s_out, t_out = _lm_forward(student, batch), _lm_forward(teacher, batch)
        mapping, mask = layer_map(student, teacher), batch["attention_mask"]
        logit = lm_distill_loss(s_out, t_out, mapping, mask, DistillSettings(
            feature_weight=0.0, logit_weight=1.0, temperature=settings.temperature))
        feature = lm_distill_loss(s_out, t_out, mapping, mask, DistillSettings(feature_weight=1.0, logit_weight=0.0))
    return {"kl": float(logit), "feature_mse_sum": float(feature)}


def distill_mode(args, command: str) -> None:
    """Prune each ``--distill-configs`` row, distil it for ``--distill-steps``, perplexity before and after;
    append a section to ``--out``."""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    adapter = CausalLMAdapter()
    loaded = adapter.load("smollm2", torch.float32, "cpu")
    dense = loaded.model
    spec = DataSpec(name="wikipedia", seq_len=args.eval_len, eval_windows=args.eval_windows)
    windows, _ = calibration_windows(loaded.processor, DataSpec(name="wikipedia", seq_len=args.score_len),
                                     args.score_windows, 0)
    batch = {"input_ids": windows, "attention_mask": torch.ones_like(windows)}
    train, _ = calibration_windows(loaded.processor, DataSpec(name="wikipedia", seq_len=args.distill_len),
                                   args.distill_windows, 1)
    data = {"input_ids": train, "attention_mask": torch.ones_like(train)}
    settings = DistillSettings(steps=args.distill_steps, lr=args.distill_lr, batch_size=args.distill_batch,
                               eval_every=args.distill_eval_every, patience=args.patience, val_fraction=0.2,
                               feature_weight=args.feature_weight, logit_weight=1.0, temperature=args.temperature)

    def perplexity(model) -> float:
        metrics, _ = adapter.evaluate(LoadedModel(model, loaded.processor), spec, 8, args.eval_windows, "cpu")
        return metrics["perplexity"]

    reuse = {}
    if args.structure_from:
        for r in json.loads(Path(args.structure_from).read_text()):
            if r["method"] != "dense" and r["width"] == 1.0:
                reuse[f"{r['method']}:{r['width']}:{r['depth']}"] = r["structure"]
    rows, raw = [], []
    dense_ppl = perplexity(dense)
    for config in args.distill_configs.split(","):
        method, width, depth = config.split(":")
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        if config in reuse:  # the kept layers of an earlier depth-only row: the same model, without rescoring
            (tower,) = structured_towers(model)
            tag_parent_indices(tower)
            apply_structure(model, {"language": reuse[config]})
            report = {"scoring_cost": f"reused from {args.structure_from}"}
        else:
            report = structured_prune(model, StructuredSettings(
                method, width_ratio=float(width), depth_ratio=float(depth), ffn_group=args.ffn_group,
                metric="lm_loss", max_rows=args.max_rows), batch)
        prune_s = time.perf_counter() - start
        before = perplexity(model)
        terms = distill_terms(model, dense, data, settings)
        print(json.dumps({"config": config, "perplexity before": before, "initial terms": terms}), flush=True)
        start = time.perf_counter()
        history = distill_causal_lm(model, dense, data, settings)
        distill_s = time.perf_counter() - start
        row = {"method": method, "width": float(width), "depth": float(depth), "layers": len(model.model.layers),
               "params (M)": count_parameters(model) / 1e6, "perplexity before": before,
               "perplexity after": perplexity(model), "steps run": history["steps_run"],
               "best step": history["best_step"], "val loss before": history["initial_val_loss"],
               "val loss best": history["best_val_loss"], "distill (s)": f"{distill_s:.0f}"}
        rows.append(row)
        raw.append({**row, "prune_s": prune_s, "initial_terms": terms, "history": history["history"],
                    "scoring_cost": report["scoring_cost"], "structure": current_structure(model)["language"]})
        print(json.dumps(row), flush=True)
        del model
    Path(args.out).with_name(Path(args.out).stem + "_distill.json").write_text(
        json.dumps({"command": command, "dense_perplexity": dense_ppl, "rows": raw}, indent=1))
    n_val = max(1, round(settings.val_fraction * args.distill_windows))
    text = [
        "",
        f"## Recovery by distillation ({started})",
        "",
        f"Machine: {machine()}. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Command: `{command}`",
        "",
        f"Each row is pruned here (MoPE scores on {args.score_windows} calibration windows of {args.score_len} "
        f"tokens{'; depth-only rows reuse the kept layers of ' + args.structure_from if args.structure_from else ''})"
        f", then distilled from the dense SmolLM2-135M for up to {args.distill_steps} steps of "
        f"{args.distill_batch} x {args.distill_len} tokens (AdamW, lr {args.distill_lr:g}, all weights trained): "
        f"loss = T^2 KL(teacher || student) per token (T = {args.temperature:g}) + {args.feature_weight:g} x sum over "
        f"kept layers of the hidden-state MSE against the teacher layer each came from, over that layer's mean square. "
        f"{args.distill_windows - n_val} training / {n_val} validation windows (training split, seed 1); validation "
        f"every {args.distill_eval_every} steps, patience {args.patience}, best weights kept. Perplexity on "
        f"the first {args.eval_windows} held-out Wikipedia windows of {args.eval_len} tokens (dense {dense_ppl:.3f}). "
        "'distill (s)' is wall time, validations included.",
        "",
        markdown_table(rows, DISTILL_COLUMNS),
        "",
        "Loss terms before distillation (first batch): " + "; ".join(
            f"{r['method']} {r['width']:g}/{r['depth']:g}: KL {r['initial_terms']['kl']:.4f}, feature term "
            f"{r['initial_terms']['feature_mse_sum']:.4f}" for r in raw) + ".",
        "",
    ]
    with open(args.out, "a") as f:
        f.write("\n".join(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--score-windows", type=int, default=8)
    ap.add_argument("--score-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--ffn-group", type=float, default=1 / 3)
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/structured_lm.md")
    ap.add_argument("--relatency", action="store_true",
                    help="only re-measure the latency of the rows of <out>.json, in interleaved rounds")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="> 0: distil --distill-configs instead of the grid (appends a section to --out)")
    ap.add_argument("--distill-configs", default="mope:1.0:0.8,mope:0.67:1.0", help="method:width:depth,...")
    ap.add_argument("--distill-windows", type=int, default=40, help="training-split windows (80%% train, 20%% val)")
    ap.add_argument("--distill-len", type=int, default=128)
    ap.add_argument("--distill-batch", type=int, default=4)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-eval-every", type=int, default=10)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--structure-from", default=None,
                    help="a grid run's <out>.json: depth-only rows (width 1.0) named as there (e.g. mope:1.0:0.8) "
                         "reuse its kept layers instead of being scored again")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = shell_command("benchmarks.structured_lm", vars(args))
    if args.relatency:
        return relatency(args, command)
    if args.distill_steps > 0:
        return distill_mode(args, command)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    adapter = CausalLMAdapter()
    loaded = adapter.load("smollm2", torch.float32, "cpu")
    dense = loaded.model
    for t in structured_towers(dense):
        tag_parent_indices(t)
    spec = DataSpec(name="wikipedia", seq_len=args.eval_len, eval_windows=args.eval_windows)
    windows, _ = calibration_windows(loaded.processor, DataSpec(name="wikipedia", seq_len=args.score_len),
                                     args.score_windows, 0)
    batch = {"input_ids": windows, "attention_mask": torch.ones_like(windows)}

    start = time.perf_counter()
    mope = LMMoPEScorer(dense, batch, max_rows=args.max_rows)
    cached = CachedScores(mope, structured_towers(dense)[0])
    refresh_s = time.perf_counter() - start
    magnitude = MagnitudeScorer()

    rows, raw = [], []

    def measure(model, method, width, depth, scoring_s=None):
        metrics, _ = adapter.evaluate(LoadedModel(model, loaded.processor), spec, 8, args.eval_windows, "cpu")
        tower = structured_towers(model)[0]
        row = {"method": method, "width": width, "depth": depth,
               "layers": len(tower.layers), "params (M)": count_parameters(model) / 1e6,
               "layer params (M)": count_parameters(tower.layers) / 1e6, "perplexity": metrics["perplexity"],
               "latency b1 (ms)": 1000 * prefill_latency(model, 1, args.prefill, args.repeats),
               "latency b8 (ms)": 1000 * prefill_latency(model, 8, args.prefill, max(3, args.repeats // 2)),
               "scoring (s)": "-" if scoring_s is None else f"{scoring_s:.0f}"}
        rows.append(row)
        raw.append({**row, "structure": current_structure(model)["language"]})
        write(rows, raw)
        print(json.dumps(row), flush=True)

    def write(rows, raw):
        dense_row = rows[0]
        for r in rows:
            r["speedup b1"] = dense_row["latency b1 (ms)"] / r["latency b1 (ms)"]
            r["speedup b8"] = dense_row["latency b8 (ms)"] / r["latency b8 (ms)"]
        text = [
            "# Structured pruning of SmolLM2-135M: MoPE (LM loss) vs magnitude vs layer drop",
            "",
            f"Machine: {machine()}. Started {started}; this file was written "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"Command: `{command}`",
            "",
            f"Perplexity: {args.eval_windows} held-out Wikipedia windows of {args.eval_len} tokens. MoPE scores: "
            f"{args.score_windows} calibration windows of {args.score_len} tokens (training split), FFN groups of "
            f"{args.ffn_group:.3g} of the width, head units = one KV head with its 3 query heads (GQA 9/3). "
            f"Latency: prefill of {args.prefill} tokens (last-position logits), median of {args.repeats} (batch 1) / "
            f"{max(3, args.repeats // 2)} (batch 8) runs, {args.threads} threads. No distillation. 'scoring (s)' is "
            "the wall time of the MoPE scores that row needed (width or layer scores, computed once and shared "
            "by the rows of the same kind).",
            "",
            markdown_table(rows, COLUMNS),
            "",
            f"MoPE forward passes so far: {json.dumps(mope.cost)} (dense forward and input caching: "
            f"{refresh_s:.0f} s; width scores {cached.seconds['width']:.0f} s, layer scores "
            f"{cached.seconds['layers']:.0f} s).",
            "",
        ]
        Path(args.out).write_text("\n".join(text))
        Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1))

    measure(dense, "dense", 1.0, 1.0)
    for method, width, depth in GRID:
        model = copy.deepcopy(dense)
        settings = StructuredSettings(method, width_ratio=width, depth_ratio=depth, ffn_group=args.ffn_group,
                                      metric="lm_loss")
        scorer = cached if method == "mope" else magnitude
        before = dict(cached.seconds)
        if width < 1:
            prune_width(model, scorer, settings)
        if depth < 1:
            prune_depth(model, scorer, settings)
        spent = sum(cached.seconds.values()) - sum(before.values()) if method == "mope" else None
        measure(model, method, width, depth, spent)
        del model


if __name__ == "__main__":
    main()
