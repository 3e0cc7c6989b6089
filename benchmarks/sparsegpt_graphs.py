"""SparseGPT's column loop on a GPU: run eagerly from Python, or replayed as CUDA graphs (the default).

For each weight shape (out x in) of SmolLM2-135M and one of a 7B LLaMA, one random weight and the
Hessian of correlated random inputs; times ``SparseGPTPruner(cuda_graphs=False)`` and the default
graphed pruner (a graph per block shape, captured at its first use and replayed after) at 50%
unstructured, and checks that both give the same weights and mask bit for bit.

    python -m benchmarks.sparsegpt_graphs            # needs a CUDA GPU

Times are medians of ``--repeats`` calls after one warm-up call (which, for the graphed pruner, is
the one that captures the graphs), with the GPU synchronised around each call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]


def time_call(fn, repeats: int) -> float:
    import torch

    fn()  # warm-up (and graph capture)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape: tuple[int, int], repeats: int) -> dict:
    import torch

    from vlmprune.pruners import PRUNERS, InputStats

    rows, cols = shape
    torch.manual_seed(0)
    layer = torch.nn.Linear(cols, rows, bias=False, device="cuda")
    stats = InputStats(layer, need_hessian=True)
    stats.add_batch(torch.randn(4096, cols, device="cuda") @ torch.randn(cols, cols, device="cuda") / cols**0.5)
    weight = layer.weight.detach()
    eager, graphed = PRUNERS.get("sparsegpt")(cuda_graphs=False), PRUNERS.get("sparsegpt")()
    t_eager = time_call(lambda: eager.prune(weight, stats, 0.5, None), repeats)
    t_graph = time_call(lambda: graphed.prune(weight, stats, 0.5, None), repeats)
    (w_e, m_e), (w_g, m_g) = eager.prune(weight, stats, 0.5, None), graphed.prune(weight, stats, 0.5, None)
    return {"shape": f"{rows} x {cols}", "eager s": t_eager, "graphs s": t_graph,
            "eager us/column": 1e6 * t_eager / cols, "graphs us/column": 1e6 * t_graph / cols,
            "speed-up": t_eager / t_graph, "bit-identical": bool(torch.equal(w_e, w_g) and torch.equal(m_e, m_g))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()

    import torch

    from benchmarks.common import machine, markdown_table

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.sparsegpt_graphs needs a CUDA GPU (CUDA graphs are a GPU feature)")
    rows = [measure(shape, args.repeats) for shape in SHAPES]
    text = (f"SparseGPT, 50% unstructured, blocks of 128 columns: eager column loop vs CUDA graphs; median of "
            f"{args.repeats} calls after a warm-up.\nMachine: {machine()}.\nCommand: python -m "
            f"benchmarks.sparsegpt_graphs --repeats {args.repeats}\n\n{markdown_table(rows, list(rows[0]))}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
