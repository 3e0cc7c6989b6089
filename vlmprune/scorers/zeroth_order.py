"""Zeroth-order group scores: central finite differences along random directions (forward passes only).

ECoFLaP's point (Sung et al. 2024, METHODS.md section 2) is that the coarse
stage needs no backward pass: the size of the loss gradient w.r.t. a set of
weights is estimated from two forward passes along a random direction.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .block_cache import BlockCache, hidden_of
from .base import (
    SCORERS,
    LossFn,
    accumulation_dtype,
    ScoredLayer,
    ScoreResult,
    check_batches,
    check_variant,
    collect_layers,
    derived_seed,
    group_totals,
    isolated_rng,
    module_modes,
    progress_bar,
)

GRANULARITIES = ("group", "tensor")
DIFFERENCES = ("central", "forward")


@SCORERS.register("zeroth_order")
def zeroth_order(
    model: nn.Module,
    groups: dict[str, dict[str, nn.Module]],
    loss_fn: LossFn,
    batches: list[dict],
    *,
    variant: str = "grad",
    seed: int = 0,
    progress: bool = False,
    granularity: str = "group",
    eps: float = 1e-3,
    n_directions: int = 1,
    eval_mode: bool = True,
    blocks: dict[str, nn.Module] | None = None,
    towers: dict[str, list[str]] | None = None,
    difference: str = "central",
    hold: Callable[[str], contextlib.AbstractContextManager] | None = None,
    head: nn.Module | None = None,
    l1_estimate: bool = False,
) -> ScoreResult:
    """Score groups by finite-difference directional derivatives of the loss, without backprop.

    A *unit* is the set of weights perturbed together: one prunable weight
    tensor (``granularity="tensor"``) or all prunable weights of one group
    (``granularity="group"``, the default). For every unit u, batch b and
    direction k, draw z ~ N(0, I) shaped like the unit's weights (for a group:
    one joint direction, the concatenation of one normal tensor per layer)
    from a ``torch.Generator`` seeded by (seed, granularity, unit, b, k), and
    take the central difference with every other weight fixed:

        d_ubk = [L_b(W_u + eps z) - L_b(W_u - eps z)] / (2 eps)  ~=  g_ub . z

    where g_ub is the gradient of the batch loss w.r.t. W_u. With K =
    ``n_directions`` directions per batch, the per-layer score s_l is

    - ``grad``: s = sum_b (1/K) sum_k |d_ubk|. For tensor granularity that is
      s_l. For group granularity this is the group score S_g; a single joint
      direction cannot say how much of it each layer carries, so
      ``layer_scores`` splits S_g in proportion to the layers' weight counts
      (use tensor granularity for real per-layer scores).
    - ``weight_grad``: the per-element gradient estimate is d_ubk * z (unbiased
      for g_ub), so s_l = sum_b (1/K) sum_k sum_elements |W_l| |d_ubk z_l|.
    - ``weight_grad_sq``: s_l = sum_b (1/K) sum_k sum_elements W_l^2 (d_ubk z_l)^2.

    S_g = sum of s_l over the group.

    How the two granularities relate to the reference (ylsung/ECoFLaP,
    ``layer_single_base_pruner.py``, the per-tensor zeroth-order scorer):
    ``granularity="tensor"`` with K = 1 is the reference estimator for
    ``grad``: one random direction per tensor per batch, s_l = sum_b |d_lb|,
    S_g = sum_l s_l. Since g . z ~ N(0, ||g||_2^2) for z ~ N(0, I),
    E[(g . z)^2] = ||g||_2^2 and E|g . z| = sqrt(2/pi) ||g||_2, so

    - tensor granularity:  E[S_g] = sqrt(2/pi) sum_b sum_{l in g} ||g_lb||_2,
      the sum of the per-tensor L2 gradient norms (reference);
    - group granularity:   E[S_g] = sqrt(2/pi) sum_b ||g_gb||_2, the L2 norm
      of the whole group's gradient, which is at most the tensor sum and at
      least 1/sqrt(n_tensors) of it.

    Both rank groups by gradient size; they are not the same number. Their
    noise-free values are the first-order ``grad`` scores with
    ``norm="l2"`` (tensor) and ``norm="l2_group"`` (group), up to
    sqrt(2/pi); the first-order default is an L1 norm (see ``first_order``).
    The relative standard deviation of one |g . z| is sqrt((pi - 2) / 2)
    ~= 0.76; averaging K directions divides it by sqrt(K).
    Cost: 2 forwards per unit per batch per direction, so 2 * K * groups *
    batches (group) against 2 * K * tensors * batches (tensor, the reference:
    hundreds of forwards for a large model).

    Differences from the reference, besides the granularity option: the
    reference sums |d| over its ``num_noise`` directions where this averages
    them (a constant factor); its ``aobd``/``obd`` variants multiply |W| (W^2)
    by the tensor's scalar score (squared), where ``weight_grad``
    (``weight_grad_sq``) here uses the element-wise estimate d z. For a large
    tensor |d| and |z_i| are nearly independent, so E[weight_grad] ~=
    (2/pi) ||W_l||_1 ||g_l||_2 per batch against the reference's
    sqrt(2/pi) ||W_l||_1 ||g_l||_2. The reference perturbs in place and
    subtracts the perturbation back, drifting the weights by ~1e-6; here the
    weights are copied before and restored from the copy, so they are
    bit-identical afterwards.

    Options:
        granularity: "group" (default, cheap) or "tensor" (the reference).
        eps: finite-difference step (reference 1e-3). Low-precision weights
            (bf16/fp16) round W +- eps z, which makes the estimate noisier.
        n_directions: K, directions per unit per batch, averaged.
        eval_mode: put every module in eval mode while scoring (default), so
            dropout does not differ between the two forwards of a difference;
            each module's own flag is restored afterwards. Whatever randomness
            the loss still draws is re-seeded identically for both forwards.

        blocks: group name -> its block module, to run each perturbed forward
            from the perturbed block on (:mod:`vlmprune.scorers.block_cache`):
            per batch, one clean forward records the order the blocks run
            in; a perturbation of group k then skips the blocks that ran
            before it, block k - 1 answering with its clean output. Same estimator, same directions, same numbers to
            rounding; the cost of a perturbed forward falls from all L blocks
            of a chain to blocks k..L-1 (about half on average), plus one
            evaluation of block k - 1 to get block k's clean input again.
            Extra memory: one hidden state of one batch per tower (the clean
            input of the block being perturbed), plus the last output of each
            tower that a later tower reads.
        towers: tower name -> its group names in order (one chain per tower);
            default: all of ``blocks`` as one chain.
        difference: "central" (the reference, 2 forwards per unit per batch)
            or "forward": d = [L_b(W_u + eps z) - L_b(W_u)] / eps, reusing the
            clean loss of the cached forward, 1 forward per unit per batch.
            Its bias is eps z^T H z / 2 (H the Hessian of the batch loss in
            the unit's weights) against O(eps^2) for the central difference;
            needs ``blocks``.
        hold: group name -> a context manager that keeps that group's weights
            in place while it is perturbed (offloaded models,
            :mod:`vlmprune.offload`: the other groups come in for their own
            calls); the weights are restored before it ends.
        head: linearise the loss at this module's input (an LM head: the loss
            must read every block through that one input, in one call per
            forward). Per batch, the clean forward also gives the head's input
            h0 and G = dL/dh0, by a backward pass through the head and the loss
            only (no block is differentiated); each perturbed forward then
            stops at the head, and its loss change is taken as G . (h - h0):

                forward: d = G . (h(W_u + eps z) - h0) / eps
                central: d = G . (h(W_u + eps z) - h(W_u - eps z)) / (2 eps)

            Same directions, same differences through the blocks; what is
            dropped is the head's and the loss's curvature, of order eps^2 in
            the central difference (where the exact loss's second-order terms
            cancel too) and eps in the forward one (where it removes part of
            the bias). What is saved is the head and the loss in every
            perturbed forward: for SmolLM2 (49k-token vocabulary) they cost
            about 17 blocks, so a perturbed forward from block k runs 30 - k
            blocks instead of 30 - k + 17. Extra memory: h0 and G, two hidden
            states of one batch, plus the gradient of the logits in the clean
            forward's backward pass. Needs ``blocks``.
        l1_estimate: ``grad`` only: multiply each unit's score by sqrt(n_u),
            n_u its weight count, so that it estimates sum_b ||g_ub||_1 (the
            first-order default, the reference's GradOnly) instead of an L2
            norm. Since E|g . z| = sqrt(2/pi) ||g||_2,

                sqrt(n) E|g . z| = kappa ||g||_1,
                kappa = sqrt(2/pi) * rms(g) / mean|g|,

            and kappa = 1 when g's entries are spread like a zero-mean normal
            (mean|g| = sqrt(2/pi) rms(g)), sqrt(2/pi) ~= 0.80 when they are all
            alike in size, above 1 for heavier tails. Raw L2-type scores grow
            only with sqrt(n) for entries of one size, so a budget shared in
            proportion to them (``allocation.granularity: layer``) moves weights
            from large layers to small ones; the rescaled ones grow with n,
            like the first-order L1 scores. Between units of one size (the
            blocks of one tower) the factor is a constant and changes nothing.
            No factor can undo tails that differ between layers: on SmolLM2
            kappa is 1.2-1.6 for the MLP layers and 2.3-3.3 for the query,
            key and value layers (``benchmarks/l1_estimate.py``).

    Runs under ``torch.no_grad()`` (with ``head``, the head and the loss of each clean forward are
    differentiated); the extra memory is a copy of one unit's
    weights plus one direction of that size (plus the block records above). ``seed`` makes the scores
    reproducible and leaves the caller's RNG state untouched.
    """
    check_variant(variant)
    check_batches(batches)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; known: {', '.join(GRANULARITIES)}")
    if difference not in DIFFERENCES:
        raise ValueError(f"unknown difference {difference!r}; known: {', '.join(DIFFERENCES)}")
    if difference == "forward" and blocks is None:
        raise ValueError("difference='forward' reuses the clean loss of the cached forward: pass blocks")
    if head is not None and blocks is None:
        raise ValueError("head (a linearised loss) takes its gradient in the cached clean forward: pass blocks")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
    if l1_estimate and variant != "grad":
        raise ValueError(f"l1_estimate rescales the grad variant's |g . z| scores; variant {variant!r} weighs each "
                         "element already")

    layers = collect_layers(model, groups)
    units = _units(layers, granularity)
    hold = hold or (lambda group: contextlib.nullcontext())
    per_layer = {layer.name: 0.0 for layer in layers}
    per_unit = {name: 0.0 for name, _ in units}
    counts = {"forwards": 0}
    modes = module_modes(model, train=False) if eval_mode else contextlib.nullcontext()
    bar = progress_bar(len(units) * len(batches) * n_directions, "zeroth-order scores", progress)

    def score_unit(unit: str, members: list[ScoredLayer], originals: list[Tensor], b: int, batch: dict,
                   reseed, probe: _LossProbe | _HeadProbe, one_sided: bool, cache: BlockCache | None = None) -> None:
        weights = [m.weight for m in members]
        for k in range(n_directions):
            pair_seed = derived_seed(seed, granularity, unit, b, k)
            directions = _directions(originals, pair_seed)
            values = []
            for sign in ((1.0,) if one_sided else (1.0, -1.0)):
                _set_perturbed(weights, originals, directions, sign * eps)

                def forward(pair_seed=pair_seed):
                    reseed(pair_seed)  # every forward of a difference draws the same randomness
                    return loss_fn(model, batch)
                values.append(probe.measure(lambda: cache.run(forward) if cache is not None else forward()))
                counts["forwards"] += 1
            if one_sided:
                d = probe.change(values[0], probe.clean) / eps
            else:
                d = probe.change(values[0], values[1]) / (2.0 * eps)
            if not math.isfinite(d):
                raise FloatingPointError(f"non-finite loss (difference {d}) while perturbing {unit!r} on batch {b}")
            per_unit[unit] += abs(d) / n_directions
            if variant != "grad":
                for member, w0, z in zip(members, originals, directions):
                    per_layer[member.name] += _weighted(variant, d, w0, z) / n_directions
            bar.update(1)
        for w, w0 in zip(weights, originals):
            w.copy_(w0)

    with torch.no_grad(), modes, isolated_rng([x.weight for x in layers], seed) as reseed, bar:
        if blocks is None:
            for unit, members in units:
                with hold(members[0].group):
                    originals = [m.weight.detach().clone() for m in members]
                    try:
                        for b, batch in enumerate(batches):
                            score_unit(unit, members, originals, b, batch, reseed, _LossProbe(), False)
                    finally:
                        _restore(members, originals)
        else:
            chains = towers or {"all": list(blocks)}
            for b, batch in enumerate(batches):
                cache = BlockCache(blocks, chains)

                def clean_forward(batch=batch, b=b):
                    reseed(derived_seed(seed, "clean", b))
                    return loss_fn(model, batch)

                if head is None:
                    probe = _LossProbe(cache.capture(clean_forward))
                else:
                    probe = _HeadProbe.capture(cache, clean_forward, head)
                counts["forwards"] += 1
                if b == 0:
                    cache.verify(clean_forward)  # the same randomness as the recorded forward
                    counts["forwards"] += len(chains)
                # in the order the blocks run, so each block's clean input is computed from the last one's
                for unit, members in sorted(units, key=lambda u: cache.begin(u[1][0].group)):
                    with hold(members[0].group), cache.start_at(members[0].group):
                        originals = [m.weight.detach().clone() for m in members]
                        try:
                            score_unit(unit, members, originals, b, batch, reseed, probe, difference == "forward",
                                       cache)
                        finally:
                            _restore(members, originals)

    if l1_estimate:
        for unit, members in units:
            per_unit[unit] *= math.sqrt(sum(m.weight.numel() for m in members))
    if variant == "grad" and granularity == "group":
        group_scores = dict(per_unit)
        for unit, members in units:
            total = sum(m.weight.numel() for m in members)
            for m in members:
                per_layer[m.name] = per_unit[unit] * m.weight.numel() / total
    else:
        if variant == "grad":  # tensor granularity: one unit per layer
            per_layer = {name: per_unit[name] for name in per_layer}
        group_scores = group_totals(layers, per_layer)
    return ScoreResult(group_scores, per_layer, forward_passes=counts["forwards"], backward_passes=0)


def directional_derivative_sums(model: nn.Module, groups: dict[str, dict[str, nn.Module]], loss_fn: LossFn,
                                batches: list[dict], granularity: str = "group", seed: int = 0) -> dict[str, float]:
    """What ``zeroth_order`` (``grad`` variant, one direction, ``seed``) estimates without its finite
    difference: sum_b |g_ub . z_ub| per unit u (group or tensor), with the scorer's own directions z_ub
    and the true gradients g_ub of each batch loss, by backprop. For checking the estimator."""
    units = _units(collect_layers(model, groups), granularity)
    totals = {unit: 0.0 for unit, _ in units}
    for b, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        with torch.no_grad():
            for unit, members in units:
                directions = _directions([m.weight for m in members], derived_seed(seed, granularity, unit, b, 0))
                totals[unit] += abs(sum(float(torch.sum(m.weight.grad.double() * z.double()))
                                        for m, z in zip(members, directions)))
    model.zero_grad(set_to_none=True)
    return totals


def _units(layers: list[ScoredLayer], granularity: str) -> list[tuple[str, list[ScoredLayer]]]:
    if granularity == "tensor":
        return [(layer.name, [layer]) for layer in layers]
    units: dict[str, list[ScoredLayer]] = {}
    for layer in layers:
        units.setdefault(layer.group, []).append(layer)
    return list(units.items())


def _restore(members: list[ScoredLayer], originals: list[Tensor]) -> None:
    for member, w0 in zip(members, originals):
        member.weight.copy_(w0)


def _directions(originals: list[Tensor], seed: int) -> list[Tensor]:
    """One standard normal tensor per weight, from generators seeded by (seed, position)."""
    generators: dict[torch.device, torch.Generator] = {}
    out = []
    for i, w0 in enumerate(originals):
        gen = generators.get(w0.device)
        if gen is None:
            gen = generators[w0.device] = torch.Generator(device=w0.device)
        gen.manual_seed(derived_seed(seed, i))
        out.append(torch.randn(w0.shape, generator=gen, dtype=w0.dtype, device=w0.device))
    return out


def _set_perturbed(weights: list[nn.Parameter], originals: list[Tensor], directions: list[Tensor], step: float) -> None:
    """W = W0 + step * z, written from the saved copy (never by undoing an earlier step)."""
    for w, w0, z in zip(weights, originals, directions):
        w.copy_(w0)
        w.add_(z, alpha=step)


class _LossProbe:
    """What a perturbed forward is measured by: its loss (``clean``: the clean forward's loss)."""

    def __init__(self, clean: float | None = None):
        self.clean = clean

    @staticmethod
    def measure(run: Callable[[], Tensor]) -> float:
        loss = run()
        return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)

    @staticmethod
    def change(after: float, before: float) -> float:
        return after - before


class _HeadReached(Exception):
    """Ends a perturbed forward at the loss head, carrying the head's input."""

    def __init__(self, hidden: Tensor):
        super().__init__("loss head reached")
        self.hidden = hidden


class _HeadProbe:
    """The loss linearised at the input of ``head`` (see ``zeroth_order``'s ``head``): a perturbed
    forward is measured by the head's input h, stopping there, and a change of h by G . dh."""

    def __init__(self, head: nn.Module, clean: Tensor, gradient: Tensor):
        self.dtype = accumulation_dtype(gradient.device)
        self.head, self.clean, self.gradient = head, clean, gradient.to(self.dtype).flatten()

    @classmethod
    def capture(cls, cache: BlockCache, forward: Callable[[], Tensor], head: nn.Module) -> "_HeadProbe":
        """Capture the clean ``forward()`` in ``cache``; its head input h0 and dL/dh0 give the probe.

        At the head, the input is swapped for a leaf that requires grad and grad mode is switched on
        (``BlockCache.capture`` runs under ``no_grad``, whose exit switches it off again), so the graph
        holds the head and the loss only."""
        leaves: list[Tensor] = []
        gradient: list[Tensor] = []

        def to_leaf(module, args, kwargs):
            if not args:
                raise RuntimeError("scoring.head linear: the loss head was called without a positional input")
            leaves.append(args[0].detach().requires_grad_())
            torch.set_grad_enabled(True)
            return (leaves[-1], *args[1:]), kwargs

        def run():
            loss = forward()
            if leaves:  # the clean forward itself (forwards that compute a block output again stop earlier)
                if len(leaves) != 1:
                    raise RuntimeError(f"scoring.head linear: the loss head ran {len(leaves)} times in one forward; "
                                       "it must run once (use scoring.head: exact)")
                gradient.extend(torch.autograd.grad(loss, leaves))
            return loss.detach()

        handle = head.register_forward_pre_hook(to_leaf, with_kwargs=True)
        try:
            cache.capture(run)
        finally:
            handle.remove()
        if not gradient:
            raise RuntimeError("scoring.head linear: the clean forward never called the loss head")
        return cls(head, leaves[0].detach(), gradient[0])

    def measure(self, run: Callable[[], Tensor]) -> Tensor:
        def stop(module, args, kwargs):
            raise _HeadReached(hidden_of(args, kwargs))

        handle = self.head.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            run()
        except _HeadReached as reached:
            return reached.hidden
        finally:
            handle.remove()
        raise RuntimeError("scoring.head linear: a perturbed forward never called the loss head")

    def change(self, after: Tensor, before: Tensor) -> float:
        """G . (after - before), accumulated in float64 (float32 where the device has none)."""
        return float(torch.dot(self.gradient, (after - before).to(self.dtype).flatten()))


def _weighted(variant: str, d: float, w0: Tensor, z: Tensor) -> float:
    """sum |W| |d z| or sum W^2 (d z)^2 over one tensor's elements, accumulated in float64."""
    wz = w0 * z
    dtype = accumulation_dtype(wz.device)
    if variant == "weight_grad":
        return abs(d) * float(torch.linalg.vector_norm(wz, 1, dtype=dtype))
    return d * d * float(torch.linalg.vector_norm(wz, 2, dtype=dtype)) ** 2
