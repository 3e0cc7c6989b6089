"""Pruning SmolLM2-135M in memory vs with its blocks offloaded (runtime.offload: cpu, disk).

Each mode runs the prune stage (Wanda, 50%, uniform) in its own process, through the command line,
on the same calibration sample; peak resident memory is sampled from the OS by the stage itself
(``prune/meta.json``), beside the resident memory when the stage began (the libraries and the
calibration data) so the model's own share can be read off. The pruned checkpoints of the modes
are compared tensor by tensor.

    python -m benchmarks.offload                          # 32 windows x 256 tokens, 1 thread
    python -m benchmarks.offload --samples 128 --seq-len 512

SmolLM2 ships as a GGUF file; disk offload reads safetensors, so the model is first converted once
(``vlmprune convert smollm2 DIR``, float32) and every mode loads that directory.

The second table extrapolates to larger LLaMA-shaped models: the memory a mode needs is
``start + weights held + activations``, where the weights held are the whole model in memory, and
the resident part (embeddings, head) plus one block when offloaded to disk; the activation term
is measured here and scaled with hidden size x tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, machine, markdown_table

MODES = ("none", "cpu", "disk")
# published configurations (hidden, intermediate, layers, vocab, kv heads / heads)
SHAPES = {
    "Llama-2-7B": (4096, 11008, 32, 32000, 1.0),
    "Llama-2-13B": (5120, 13824, 40, 32000, 1.0),
    "Llama-2-70B": (8192, 28672, 80, 32000, 0.125),
    "Llama-3-405B": (16384, 53248, 126, 128256, 0.125),
}


def llama_sizes(hidden: int, intermediate: int, layers: int, vocab: int, kv: float) -> tuple[int, int, int]:
    """(total, resident, per-block) parameter counts of a LLaMA-shaped model with untied embeddings."""
    block = hidden * hidden * (2 + 2 * kv) + 3 * hidden * intermediate + 2 * hidden
    resident = 2 * vocab * hidden + hidden
    return layers * block + resident, resident, block


def cli(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, check=True)


def run(args) -> tuple[list[dict], dict]:
    work = Path(args.work).resolve()
    model = work / "smollm2-fp32"
    if not (model / "model.safetensors").exists():
        cli("convert", "smollm2", str(model), "-p", "params/presets/smollm2.yaml", threads=args.threads)
    settings = ["-p", "params/presets/smollm2.yaml", "-S", f"artifacts={work / 'artifacts'}", "-S", f"model.id={model}",
                "-S", "model.family=causal_lm", "-S", "model.device=cpu", "-S", f"calibration.n_samples={args.samples}",
                "-S", f"calibration.batch_size={args.batch_size}", "-S", f"data.seq_len={args.seq_len}",
                "-S", "tracking.enabled=false"]
    for stage in ("calibrate", "score", "allocate"):
        cli("stage", stage, *settings, threads=args.threads)
    rows, reference = [], None
    from vlmprune.offload import Checkpoint

    for mode in MODES:
        started = time.perf_counter()
        cli("stage", "prune", *settings, "-S", f"runtime.offload={mode}", threads=args.threads)
        process_s = time.perf_counter() - started
        meta = json.loads((work / "artifacts/prune/meta.json").read_text())
        checkpoint = Checkpoint(work / "artifacts/prune/model")
        tensors = checkpoint.read(sorted(checkpoint.names()))
        if reference is None:
            reference, same = tensors, "reference"
        else:
            same = "yes" if tensors.keys() == reference.keys() and all(
                (tensors[k] == reference[k]).all() for k in tensors) else "NO"
        usage = meta["usage"]
        rows.append({"mode": mode, "stage wall s": round(usage["wall_s"], 1), "process wall s": round(process_s, 1),
                     "peak RSS MB": round(usage["peak_rss_mb"]), "RSS at start MB": round(usage["start_rss_mb"]),
                     "peak - start MB": round(usage["peak_rss_mb"] - usage["start_rss_mb"]),
                     "same weights": same})
    weights_mb = sum(t.numel() * t.element_size() for t in reference.values()) / 2**20
    return rows, {"weights_mb": weights_mb, "n_tensors": len(reference)}


def fit_table(rows: list[dict], weights_mb: float, args, memory_gb: list[float]) -> tuple[list[dict], dict]:
    """Memory each mode needs for LLaMA-shaped models in bfloat16, from the measured terms."""
    by_mode = {r["mode"]: r for r in rows}
    start = by_mode["none"]["RSS at start MB"]
    # activations (and the engine's own buffers): what the in-memory peak holds beyond the weights
    activations_mb = max(by_mode["none"]["peak - start MB"] - weights_mb, 0.0)
    per_unit = activations_mb / (576 * args.samples * args.seq_len)  # MB per hidden unit x token
    terms = {"start_mb": start, "activations_mb": round(activations_mb)}
    table = []
    for name, shape in SHAPES.items():
        total, resident, block = llama_sizes(*shape)
        act = per_unit * shape[0] * args.samples * args.seq_len
        gb = 2 / 2**30  # bfloat16 bytes per parameter, in GiB
        need = {"none": start / 1024 + total * gb + act / 1024,
                "disk": start / 1024 + (resident + block) * gb + act / 1024}
        row = {"model": name, "params B": round(total / 1e9, 1),
               "in memory GiB": round(need["none"], 1), "disk offload GiB": round(need["disk"], 1),
               "disk space GiB": round(total * gb, 1)}
        for gib in memory_gb:
            row[f"fits {gib:g} GiB"] = ("both" if need["none"] <= gib else "disk only" if need["disk"] <= gib
                                        else "neither")
        table.append(row)
    return table, terms


def describe(args, weights_mb: float, terms: dict) -> str:
    return (f"Wanda 50%, uniform, {args.samples} calibration windows x {args.seq_len} tokens, batch {args.batch_size}, "
            f"float32 ({weights_mb:.0f} MB of weights). Each mode runs the prune stage in its own process; peak RSS "
            "is sampled every 20 ms by the stage; 'RSS at start' is the process when the stage began (Python, "
            "torch, transformers, Prefect, the calibration sample). Activations and engine buffers measured: "
            f"{terms['activations_mb']} MB.")


def suite(profile: str, out: str, samples: int = 32, seq_len: int = 256, batch_size: int = 8, threads: int = 1,
          work: str = "/tmp/vlmprune-offload"):
    """Runner entry point (``kind: script``): the in-memory vs offloaded table, one row per mode."""
    from benchmarks.common import shell_command
    from benchmarks.report import SuiteResult

    args = argparse.Namespace(samples=samples, seq_len=seq_len, batch_size=batch_size, threads=threads, work=work)
    rows, info = run(args)
    _, terms = fit_table(rows, info["weights_mb"], args, [])
    command = shell_command("benchmarks.offload", {"samples": samples, "seq_len": seq_len, "batch_size": batch_size,
                                                   "threads": threads})
    return SuiteResult(
        name="offload", title="", rows=rows, metric="peak - start MB", higher_is_better=False,
        columns=list(rows[0]), methodology=describe(args, info["weights_mb"], terms) + " One run per mode.",
        settings=[f"samples={samples}", f"seq_len={seq_len}", f"batch_size={batch_size}", f"threads={threads}"],
        notes=[f"Equivalent stand-alone command (also prints the what-fits table): `{command}`."], x="mode", group="mode")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/vlmprune-offload")
    parser.add_argument("--memory-gb", type=float, nargs="+", default=[24, 80])
    parser.add_argument("--out", default="benchmarks/results/offload.md")
    args = parser.parse_args(argv)
    rows, info = run(args)
    table, terms = fit_table(rows, info["weights_mb"], args, args.memory_gb)
    command = " ".join(["python -m benchmarks.offload", *(argv if argv is not None else sys.argv[1:])])
    text = "\n\n".join([
        "# Block offloading: pruning SmolLM2-135M in memory vs offloaded",
        f"Machine: {machine()}. Command: `{command}`. Wanda 50%, uniform, {args.samples} calibration windows x "
        f"{args.seq_len} tokens, batch {args.batch_size}, float32 ({info['weights_mb']:.0f} MB of weights, "
        f"{info['n_tensors']} tensors). Each mode runs the prune stage in its own process; peak RSS is sampled "
        "every 20 ms by the stage; 'RSS at start' is the process when the stage began (Python, torch, "
        "transformers, Prefect, the calibration sample).",
        markdown_table(rows, list(rows[0])),
        "## What fits, extrapolated (bfloat16 weights)",
        f"Measured terms: RSS at start {terms['start_mb']} MB; activations and engine buffers "
        f"{terms['activations_mb']} MB at hidden size 576 (scaled with hidden size x tokens below); the same "
        f"calibration sizes. In memory holds every weight; disk offload holds the embeddings, the head and "
        "one block. The cpu mode needs the same host memory as in memory (its point is the GPU: one block "
        "on the device). Weights in bfloat16, activations in float32 as measured. This is Wanda; SparseGPT "
        "also holds one layer's Hessian (inputs^2 x 4 bytes: 3.1 GiB for the 28,672-wide down projection of "
        "Llama-2-70B).",
        markdown_table(table, list(table[0])),
    ])
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
