"""How far zeroth-order tensor scores are from the first-order L1 scores, layer by layer, and what that does to
a per-layer ECoFLaP allocation (``scoring.l1_estimate``, ``allocation.granularity: layer``).

From the true gradients g_lb of each layer l and batch b (plain backprop on the scoring windows) it computes:

- the first-order L1 score  s_l = sum_b ||g_lb||_1  (the reference's GradOnly, the target);
- the noise-free L1 estimate  e_l = sqrt(2/pi) sqrt(n_l) sum_b ||g_lb||_2, the expectation of the zeroth-order
  tensor score with ``l1_estimate`` (vlmprune/scorers/zeroth_order.py), and kappa_l = e_l / s_l, 1 when the
  gradient's entries are spread like a zero-mean normal;
- draws of the zeroth-order score itself: with z ~ N(0, I), g . z ~ N(0, ||g||_2^2) exactly, so one draw of
  the estimator with K directions per batch is  sqrt(n_l) sum_b mean_k |N(0, ||g_lb||_2^2)|,  sampled here
  without any forward pass (it is what the scorer computes, up to the finite difference's error).

Each set of scores goes through ECoFLaP's per-layer allocation at the target; the table gives, per kind of
layer (q_proj, ..., down_proj), kappa and the mean sparsity each score set gives it, and the last one the
mean absolute difference of the per-layer sparsities from those of the L1 scores.

    python -m benchmarks.l1_estimate [--samples 16 --seq-len 256 --batch-size 4 --sparsity 0.7 --draws 5]
"""

from __future__ import annotations

import argparse
import math
import statistics

from benchmarks.common import machine, markdown_table


def gradient_norms(model: str, samples: int, seq_len: int, batch_size: int, seed: int, data: str = "wikipedia") -> dict:
    """Per layer: its group, size, and the L1 and L2 norms of its gradient on each batch (``model``, ``data``:
    as in ``benchmarks.scoring_cost``, which also takes ``config:FILE.json`` and ``random``)."""
    from benchmarks.scoring_cost import CONFIG_PREFIX, batches_of, load_model, make_windows
    from vlmprune.adapters import ADAPTERS, detect_family
    from vlmprune.scorers.base import only_these_require_grad
    from vlmprune.sparsity import model_layout

    adapter = ADAPTERS.get("causal_lm" if model.startswith(CONFIG_PREFIX) else detect_family(model))()
    loaded = load_model(adapter, model, "cpu")
    batches = batches_of(make_windows(adapter, loaded, data, samples, seq_len, seed), batch_size, "cpu")
    layers = {name: (g.name, layer) for g in model_layout(loaded.model, adapter.towers(loaded.model))
              for name, layer in g.layers.items()}
    norms = {name: {"group": group, "n": layer.weight.numel(), "l1": [], "l2": []}
             for name, (group, layer) in layers.items()}
    with only_these_require_grad(loaded.model, [layer.weight for _, layer in layers.values()]):
        for batch in batches:
            loaded.model.zero_grad(set_to_none=True)
            adapter.loss(loaded.model, batch).backward()
            for name, (_, layer) in layers.items():
                g = layer.weight.grad.double()
                norms[name]["l1"].append(float(g.abs().sum()))
                norms[name]["l2"].append(float(g.norm()))
    loaded.model.zero_grad(set_to_none=True)
    return norms


def layer_units(norms: dict, scores: dict[str, float]) -> list:
    """One allocation unit (``GroupInfo``) per layer: its size and its score."""
    from vlmprune.allocators import GroupInfo

    return [GroupInfo(name, "lm", v["n"], scores[name]) for name, v in norms.items()]


def allocate(norms: dict, scores: dict[str, float], sparsity: float) -> dict[str, float]:
    from vlmprune.allocators import ALLOCATORS

    return ALLOCATORS.get("ecoflap")(layer_units(norms, scores), sparsity)


def score_sets(norms: dict, draws: int, directions: list[int], seed: int) -> dict[str, dict[str, float]]:
    """L1 scores, the noise-free L1 estimate, raw L2-type expectations, and sampled zeroth-order draws."""
    import torch

    c = math.sqrt(2 / math.pi)
    sets = {
        "first-order L1": {k: sum(v["l1"]) for k, v in norms.items()},
        "L1 estimate, noise-free": {k: c * math.sqrt(v["n"]) * sum(v["l2"]) for k, v in norms.items()},
        "L2-type, noise-free": {k: c * sum(v["l2"]) for k, v in norms.items()},
    }
    gen = torch.Generator().manual_seed(seed)
    for k in directions:
        for d in range(draws):
            sets[f"zeroth K={k} draw {d}"] = {
                name: math.sqrt(v["n"]) * sum(float(torch.randn(k, generator=gen, dtype=torch.float64).abs().mean())
                                              * s for s in v["l2"])
                for name, v in norms.items()}
    return sets


def kind_of(name: str, group: str) -> str:
    return name.removeprefix(group + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="wikipedia")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--directions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    norms = gradient_norms(args.model, args.samples, args.seq_len, args.batch_size, args.seed, args.data)
    sets = score_sets(norms, args.draws, args.directions, args.seed)
    allocations = {label: allocate(norms, scores, args.sparsity) for label, scores in sets.items()}
    reference = allocations["first-order L1"]
    kinds = sorted({kind_of(name, v["group"]) for name, v in norms.items()})
    kappa = {name: sets["L1 estimate, noise-free"][name] / sets["first-order L1"][name] for name in norms}

    def of_kind(kind):
        return [name for name, v in norms.items() if kind_of(name, v["group"]) == kind]

    rows = []
    for kind in kinds:
        names = of_kind(kind)
        row = {"layer kind": kind, "kappa mean": statistics.mean(kappa[n] for n in names),
               "kappa min": min(kappa[n] for n in names), "kappa max": max(kappa[n] for n in names)}
        for label in ("first-order L1", "L1 estimate, noise-free", "L2-type, noise-free"):
            row[label] = statistics.mean(allocations[label][n] for n in names)
        rows.append(row)
    print(f"{args.model}: {args.samples} {args.data} windows x {args.seq_len} tokens in batches of {args.batch_size}; "
          f"ECoFLaP per layer at {args.sparsity:.0%}, default cap. {machine()}")
    print(f"Command: python -m benchmarks.l1_estimate --model {args.model} --data {args.data} --samples {args.samples} "
          f"--seq-len {args.seq_len} --batch-size {args.batch_size} --sparsity {args.sparsity} --draws {args.draws} "
          f"--directions {' '.join(map(str, args.directions))} --seed {args.seed}\n")
    print("Mean sparsity per kind of layer, by score set:\n")
    print(markdown_table(rows, list(rows[0])))

    def distance(label):
        return statistics.mean(abs(allocations[label][n] - reference[n]) for n in norms)

    summary = [{"scores": label, "mean |sparsity - L1's|": distance(label)}
               for label in ("L1 estimate, noise-free", "L2-type, noise-free")]
    for k in args.directions:
        values = [distance(f"zeroth K={k} draw {d}") for d in range(args.draws)]
        summary.append({"scores": f"zeroth-order with l1_estimate, K={k} (mean of {args.draws} draws)",
                        "mean |sparsity - L1's|": statistics.mean(values)})
    print("\nDistance of each allocation from the first-order L1 one (mean over layers):\n")
    print(markdown_table(summary, list(summary[0])))


if __name__ == "__main__":
    main()
