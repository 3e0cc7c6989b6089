"""Structured pruning of a two-tower image-text model: MoPE vs magnitude vs layer drop.

For each tower and width/depth setting: zero-shot accuracy on the held-out digits (evaluation
templates; optionally class-aware retrieval R@1 both ways), parameters, weight file size and
measured CPU latency of the pruned tower (median of repeated runs after warm-up, batch 1 and 32,
fixed thread count), with and without distillation. Also unstructured Wanda at the same fraction of
the tower's prunable weights, for the structured / unstructured accuracy ratio.

:class:`Bench` serves the offline default dual encoder (this module's CLI and :func:`suite`) and
``CLIPModel`` (:mod:`benchmarks.structured_clip`, on a tiny CLIP trained offline).

    python -m benchmarks.structured                      # text tower, default grid
    python -m benchmarks.structured --towers text vision --repeats 30

Writes benchmarks/results/structured.md (or --out). Latencies on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table
from vlmprune.adapters import ADAPTERS
from vlmprune.adapters.clip import image_stats, pixel_values, tokenizer_of
from vlmprune.data.images import image_split, to_pixel_values
from vlmprune.data.spec import DataSpec
from vlmprune.evaluators.zero_shot import (
    class_embeddings,
    embed_texts,
    eval_captions,
    retrieval_recalls,
    zero_shot_accuracy,
)
from vlmprune.structured import StructuredSettings, count_parameters, structured_prune
from vlmprune.structured.distill import DistillSettings, distill
from vlmprune.structured.towers import structured_towers, tower_embed

GRID = {  # tower -> list of (method, width_ratio, depth_ratio)
    "text": [("mope", 0.5, 1.0), ("magnitude_structured", 0.5, 1.0),
             ("mope", 0.5, 0.67), ("magnitude_structured", 0.5, 0.67),
             ("mope", 1.0, 0.5), ("layer_drop", 1.0, 0.5)],
    "vision": [("mope", 0.75, 1.0), ("magnitude_structured", 0.75, 1.0),
               ("mope", 0.5, 1.0), ("magnitude_structured", 0.5, 1.0),
               ("mope", 1.0, 0.75), ("magnitude_structured", 1.0, 0.75), ("layer_drop", 1.0, 0.75)],
}
TOWER_MODULES = {  # family -> tower -> the attribute holding the whole tower (embeddings included)
    "dual_encoder": {"text": "text", "vision": "vision"},
    "clip": {"text": "text_model", "vision": "vision_model"},
}


class Bench:
    """A two-tower model of ``family`` (``dual_encoder`` or ``clip``) loaded from ``model_dir`` by its
    adapter, the digits data, and what is measured on its pruned copies. Calibration pairs (MoPE,
    distillation) come from the adapter; the family-specific parts here are only how raw images become
    pixels, how texts are tokenized and which attribute holds a tower (:data:`TOWER_MODULES`)."""

    def __init__(self, model_dir: str, repeats: int, mope_samples: int = 64, distill_samples: int = 512,
                 family: str = "dual_encoder", retrieval: bool = False):
        self.family, self.adapter = family, ADAPTERS.get(family)()
        self.loaded = self.adapter.load(str(model_dir), torch.float32, "cpu")
        self.dense = self.loaded.model
        self.spec = DataSpec(name="digits")
        self.repeats, self.retrieval = repeats, retrieval
        self.data, _, self.test = image_split(self.spec)
        calib = self.adapter.make_calibration(self.loaded, self.spec, max(128, mope_samples), 0)
        self.mope_batch = {k: v[:mope_samples] for k, v in calib.items() if k != "index"}
        self.distill_data = {k: v for k, v in self.adapter.make_calibration(self.loaded, self.spec, distill_samples,
                                                                             1).items() if k != "index"}
        self.captions = eval_captions(self.data.class_names, self.data.eval_templates, self.data.labels[self.test],
                                      self.spec.seed)
        self.dense_embeddings = self.embeddings(self.dense, None)
        prompts = [t.format(c) for c in self.data.class_names for t in self.data.eval_templates]
        self.text_inputs = {b: self.tokenize((prompts * 4)[:b]) for b in (1, 32)}
        self.pixel_inputs = {b: self.pixels(self.data.images[self.test[:b]]) for b in (1, 32)}

    def pixels(self, images) -> torch.Tensor:
        """uint8 images -> the family's pixel values (what its adapter feeds the model)."""
        if self.family == "clip":
            return pixel_values(images, self.dense.config.vision_config.image_size, *image_stats(self.loaded.processor))
        return to_pixel_values(images, self.dense.config.image_size)

    def tokenize(self, texts, padding=True, return_tensors="pt"):
        """A tokenizer call (the signature :func:`class_embeddings` expects); CLIP's texts are cut to its
        position limit, as its adapter does."""
        if self.family == "clip":
            limit = self.dense.config.text_config.max_position_embeddings
            return tokenizer_of(self.loaded.processor)(list(texts), padding=True, truncation=True, max_length=limit,
                                                       return_tensors="pt")
        return self.loaded.processor(list(texts), padding=True, return_tensors="pt")

    @staticmethod
    def encoder(model, tower: str):
        """``batch -> normalised embeddings`` of one tower of ``model`` (its own encode method)."""
        structured = structured_towers(model, [tower])[0]
        return lambda batch: tower_embed(model, structured, batch)

    @torch.no_grad()
    def embeddings(self, model, tower: str | None) -> dict[str, torch.Tensor]:
        """Held-out image embeddings, class embeddings (prompt ensembles over the evaluation templates) and,
        with ``retrieval``, one evaluation caption per held-out image; of ``tower`` only (the other tower is
        the dense model's, which pruning one tower leaves unchanged) or of both (``tower=None``)."""
        out = dict(self.dense_embeddings) if tower else {}
        if tower in (None, "vision"):
            encode, images = self.encoder(model, "vision"), self.data.images[self.test]
            out["image"] = torch.cat([encode({"pixel_values": self.pixels(images[s:s + 64])}).float()
                                      for s in range(0, len(images), 64)])
        if tower in (None, "text"):
            encode = self.encoder(model, "text")
            text = lambda ids, mask: encode({"input_ids": ids, "attention_mask": mask})
            out["classes"] = class_embeddings(text, self.tokenize, self.data.class_names, self.data.eval_templates)
            if self.retrieval:
                out["captions"] = embed_texts(text, self.tokenize, self.captions)
        return out

    def metrics(self, model, tower: str) -> dict[str, float]:
        """``accuracy`` (zero-shot) and, with ``retrieval``, class-aware ``i2t_r1`` and ``t2i_r1``."""
        e, labels = self.embeddings(model, tower), self.data.labels[self.test]
        out = {"accuracy": zero_shot_accuracy(e["image"], e["classes"], labels)}
        if self.retrieval:
            recalls = retrieval_recalls(e["image"], e["captions"], labels)
            out.update(i2t_r1=recalls["i2t_r1"], t2i_r1=recalls["t2i_r1"])
        return out

    def call(self, model, tower: str, b: int):
        encode = self.encoder(model, tower)
        batch = self.text_inputs[b] if tower == "text" else {"pixel_values": self.pixel_inputs[b]}
        return lambda: encode(batch)

    def latencies(self, models: dict, tower: str) -> dict[str, dict[str, float]]:
        """Median ms per model and batch size, timed round-robin (one run of each model per round), so
        that load from other jobs on a shared machine falls on every model alike."""
        times = {name: {1: [], 32: []} for name in models}
        with torch.no_grad():
            for name, model in models.items():  # warm-up
                for b in (1, 32):
                    for _ in range(3):
                        self.call(model, tower, b)()
            for _ in range(self.repeats):
                for name, model in models.items():
                    for b in (1, 32):
                        fn = self.call(model, tower, b)
                        start = time.perf_counter()
                        fn()
                        times[name][b].append(time.perf_counter() - start)
        return {name: {f"ms_b{b}": 1000 * statistics.median(t[b]) for b in (1, 32)} for name, t in times.items()}

    def tower_params(self, model, tower: str) -> int:
        return count_parameters(getattr(model, TOWER_MODULES[self.family][tower]))

    def row(self, model, tower, label, **extra) -> dict:
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return {"tower": tower, "config": label, "tower_params_M": self.tower_params(model, tower) / 1e6,
                "model_MB": weights / 2**20, **self.metrics(model, tower), **extra}

    def unstructured(self, tower: str, sparsity: float) -> float:
        """Zero-shot accuracy after Wanda at ``sparsity`` of the tower's prunable weights (uniform per layer)."""
        from vlmprune.pruners import PRUNERS
        from vlmprune.sequential import prune_tower_sequential
        from vlmprune.sparsity import model_layout

        model = copy.deepcopy(self.dense)
        towers = self.adapter.towers(model)
        groups = model_layout(model, towers, tower_names=[tower])
        run = next(t.run for t in towers if t.name == tower)
        n = len(next(iter(self.mope_batch.values())))
        batches = [{k: v[s:s + 32] for k, v in self.mope_batch.items()} for s in range(0, n, 32)]
        members = [(g.name, g.module, g.layers) for g in groups]
        prune_tower_sequential(model, run, batches, members, {n: sparsity for g in groups for n in g.layers},
                               PRUNERS.get("wanda")(), None, progress=False)
        return self.metrics(model, tower)["accuracy"]


def prunable_fraction_removed(dense, pruned, tower: str) -> float:
    """Fraction of the tower's Linear / ungrouped-conv weights removed (what unstructured pruning zeroes)."""
    def count(model):
        t = structured_towers(model, [tower])[0]
        return sum(m.weight.numel() for m in t.layers.modules()
                   if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1))
    return 1 - count(pruned) / count(dense)


def parse_configs(configs: list[str]) -> list[tuple[str, float, float]]:
    """``["mope:0.5:1", ...]`` -> ``[("mope", 0.5, 1.0), ...]``."""
    return [(m, float(w), float(d)) for m, w, d in (c.split(":") for c in configs)]


def run(bench: Bench, grids: dict[str, list[tuple[str, float, float]]], distill_steps: int,
        unstructured: bool = True, distill_lr: float = 1e-4) -> list[dict]:
    """Per tower: the dense row, then per (method, width, depth) a row before and one after distillation
    (AdamW at ``distill_lr``); latencies of all of a tower's models timed round-robin; speed-ups and accuracy
    change against dense."""
    rows = []
    for tower, grid in grids.items():
        models = {"dense": bench.dense}
        dense_row = bench.row(bench.dense, tower, "dense")
        rows.append(dense_row)
        print(dense_row, flush=True)
        for method, width, depth in grid:
            model = copy.deepcopy(bench.dense)
            start = time.perf_counter()
            report = structured_prune(model, StructuredSettings(method, width_ratio=width, depth_ratio=depth,
                                                                towers=[tower]), bench.mope_batch)
            prune_s = time.perf_counter() - start
            cost = report["scoring_cost"]
            label = f"{method} w{width:g} d{depth:g}"
            removed = prunable_fraction_removed(bench.dense, model, tower)
            common = {"removed": removed, "prune_s": prune_s,
                      "mope_calls": cost["forward_calls"], "mope_fwd_equiv": cost["full_forward_equivalents"]}
            row = bench.row(model, tower, label, distilled="no", **common)
            rows.append(row)
            print(row, flush=True)
            start = time.perf_counter()
            history = distill(model, bench.dense, bench.distill_data, [tower],
                              DistillSettings(steps=distill_steps, lr=distill_lr, eval_every=10, patience=5),
                              progress=False)
            row = bench.row(model, tower, label, distilled=f"yes ({history['steps_run']} steps)",
                            distill_s=time.perf_counter() - start, **common)
            if unstructured:
                row["wanda_same_budget"] = bench.unstructured(tower, removed)
            rows.append(row)
            print(row, flush=True)
            models[label] = model
        timed = bench.latencies(models, tower)
        for row in rows:
            if row["tower"] == tower:
                row.update(timed[row["config"]])
        del models
    for row in rows:
        dense = next(r for r in rows if r["tower"] == row["tower"] and r["config"] == "dense")
        row["speedup_b1"] = dense["ms_b1"] / row["ms_b1"]
        row["speedup_b32"] = dense["ms_b32"] / row["ms_b32"]
        row["d_acc_pts"] = 100 * (row["accuracy"] - dense["accuracy"])
    return rows


COLUMNS = ["tower", "config", "distilled", "tower_params_M", "model_MB", "removed", "accuracy", "d_acc_pts",
           "wanda_same_budget", "ms_b1", "ms_b32", "speedup_b1", "speedup_b32", "mope_calls", "mope_fwd_equiv",
           "prune_s", "distill_s"]
RETRIEVAL = ("i2t_r1", "t2i_r1")  # measured with Bench(retrieval=True); after distillation in the summary


def describe(n_test: int, repeats: int, threads: int, mope_samples: int, distill_samples: int,
             retrieval: bool = False) -> str:
    recalls = (" `i2t_r1` / `t2i_r1`: class-aware retrieval R@1 (image -> captions / caption -> images) between "
               "the held-out images and one evaluation-template caption each." if retrieval else "")
    return (f"Zero-shot accuracy on {n_test} held-out digits (evaluation templates).{recalls} Latency: median of "
            f"{repeats} runs of the tower's encode (after 3 warm-up runs), {threads} thread(s), all models "
            "timed round-robin (a distilled model has its undistilled twin's shape and shares its time); "
            "on a shared machine latencies are noisy. `removed`: fraction of the tower's "
            "Linear/1x1-conv weights removed; `wanda_same_budget`: unstructured Wanda accuracy at that fraction. "
            f"MoPE scored on {mope_samples} training-split pairs; `mope_calls` batched forwards, `mope_fwd_equiv` "
            f"their work in full-tower forwards. Distillation: {distill_samples} training-split pairs (20% "
            "validation), early stopping.")


def summary(rows: list[dict]) -> list[dict]:
    """One row per tower and configuration: before and after distillation side by side (what the
    README shows)."""
    out = []
    for row in rows:
        if row["config"] == "dense":
            out.append({"tower": row["tower"], "config": "dense", "tower_params_M": row["tower_params_M"],
                        "accuracy": row["accuracy"], "ms_b1": row["ms_b1"], "ms_b32": row["ms_b32"],
                        **{k: row[k] for k in RETRIEVAL if k in row}})
        elif row.get("distilled") == "no":
            after = next(r for r in rows if r["tower"] == row["tower"] and r["config"] == row["config"]
                         and r.get("distilled") != "no")
            out.append({"tower": row["tower"], "config": row["config"], "tower_params_M": row["tower_params_M"],
                        "removed": row["removed"], "accuracy": row["accuracy"], "distilled": after["accuracy"],
                        "d_acc_pts": after["d_acc_pts"], "wanda_same_budget": after.get("wanda_same_budget"),
                        "ms_b1": row["ms_b1"], "ms_b32": row["ms_b32"], "x speed b1": row["speedup_b1"],
                        "x speed b32": row["speedup_b32"], "prune_s": row["prune_s"],
                        "distill_s": after["distill_s"], "mope_calls": row["mope_calls"],
                        **{k: after[k] for k in RETRIEVAL if k in after}})
    return out


def verdicts(summary_rows: list[dict], points: float = 2.0, speedup: float = 1.3) -> list[str]:
    """Against issue #6's target: at least ``speedup`` x lower latency (batch 1) within ``points`` accuracy
    points of dense after recovery."""
    lines = []
    for r in summary_rows:
        if r["config"] == "dense":
            continue
        ok = r["x speed b1"] >= speedup and r["d_acc_pts"] >= -points
        lines.append(f"- {r['tower']}, {r['config']}: {r['x speed b1']:.2f}x at batch 1, {r['d_acc_pts']:+.1f} points "
                     f"after distillation: {'meets' if ok else 'misses'} the target")
    return lines


def measure(make_bench, grids: dict[str, list[tuple[str, float, float]]], threads: int, distill_steps: int,
            unstructured: bool = True, distill_lr: float = 1e-4) -> tuple[Bench, list[dict]]:
    """``make_bench()`` and the rows of :func:`run` on ``grids``, with ``threads`` torch threads (restored
    afterwards) and seed 0."""
    torch.manual_seed(0)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bench = make_bench()
        rows = run(bench, grids, distill_steps, unstructured, distill_lr)
    finally:
        torch.set_num_threads(threads_before)
    return bench, rows


def suite_result(name: str, bench: Bench, rows: list[dict], towers, repeats: int, threads: int, distill_steps: int,
                 mope_samples: int, distill_samples: int, notes: list[str] = ()):
    """The runner's :class:`~benchmarks.report.SuiteResult`: the :func:`summary` of :func:`measure`'s rows, with the
    target verdicts and ``notes`` after them."""
    from benchmarks.report import SuiteResult

    rows = summary(rows)
    text = describe(len(bench.test), repeats, threads, mope_samples, distill_samples, bench.retrieval)
    columns = ["tower", "config", "tower_params_M", "removed", "accuracy", "distilled", "d_acc_pts",
               *(RETRIEVAL if bench.retrieval else ()), "wanda_same_budget", "x speed b1", "x speed b32", "prune_s",
               "distill_s"]
    notes = [(f"`accuracy` before pruning's recovery, `distilled` after {distill_steps} distillation steps (at most; "
              "early stopping), `d_acc_pts` the change against dense after distillation, in points; `x speed`: "
              "the tower's latency speed-up over dense at batch 1 and 32. " + text), "",
             ("Against the structured-pruning target (at least 1.3x lower latency at batch 1 within 2 points after "
              "recovery):"), "", *verdicts(rows), *notes]
    return SuiteResult(name=name, title="", rows=rows, metric="accuracy", higher_is_better=True,
                       columns=columns, methodology=text, notes=notes,
                       settings=[f"towers={','.join(towers)}", f"repeats={repeats}", f"threads={threads}",
                                 f"distill_steps={distill_steps}"], x="", group="config")


def grids_of(towers, configs: dict[str, list[str]] | None, default: dict) -> dict[str, list[tuple[str, float, float]]]:
    """Per tower, the ``method:width:depth`` strings of ``configs`` parsed, or the tower's ``default`` grid."""
    return {t: parse_configs(configs[t]) if configs and t in configs else default[t] for t in towers}


def suite(profile: str, out: str, model: str | None = None, towers: list[str] = ("text",),
          configs: dict[str, list[str]] | None = None, repeats: int = 20, threads: int = 1,
          distill_steps: int = 100, mope_samples: int = 64, distill_samples: int = 512, unstructured: bool = True,
          artifacts: str = "artifacts"):
    """Runner entry point (``kind: script``). ``model``: a dual encoder directory (default: the offline
    default model, built by the prepare stage under ``artifacts`` when missing); ``configs``: per tower,
    ``method:width:depth`` strings (default: :data:`GRID`)."""
    from benchmarks.common import default_dual_encoder

    bench, rows = measure(lambda: Bench(model or default_dual_encoder(artifacts), repeats, mope_samples,
                                        distill_samples),
                          grids_of(towers, configs, GRID), threads, distill_steps, unstructured)
    notes = []
    if distill_steps < 100 or repeats < 20:
        notes += ["", ("Smaller than the hand-run table (100 distillation steps, 20 latency repeats, "
                       "`benchmarks/results/structured.md`) to fit the `readme` profile.")]
    return suite_result("structured", bench, rows, towers, repeats, threads, distill_steps, mope_samples,
                        distill_samples, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="artifacts/prepare/model")
    parser.add_argument("--towers", nargs="+", default=["text"], choices=["text", "vision"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--no-unstructured", action="store_true")
    parser.add_argument("--configs", nargs="+", default=None, metavar="METHOD:WIDTH:DEPTH",
                        help="replace the default grid, e.g. mope:0.75:1 layer_drop:1:0.75")
    parser.add_argument("--out", default="benchmarks/results/structured.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bench = Bench(args.model, args.repeats)
    grids = {t: parse_configs(args.configs) if args.configs else GRID[t] for t in args.towers}
    rows = run(bench, grids, args.distill_steps, not args.no_unstructured)
    table = markdown_table(rows, COLUMNS)
    text = (f"# Structured pruning of the default dual encoder\n\n{machine()}\n\n"
            f"`python -m benchmarks.structured {' '.join(f'--towers {t}' for t in args.towers)} "
            f"--repeats {args.repeats} --threads {args.threads} --distill-steps {args.distill_steps}"
            f"{' --configs ' + ' '.join(args.configs) if args.configs else ''}`\n\n"
            f"{describe(len(bench.test), args.repeats, args.threads, 64, 512)}\n\n{table}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
