"""The structural-risk-minimization penalty: a bound on a policy's generalization gap.

EfficientLLaVA (Liang et al., CVPR 2025; seed 001, METHODS.md section 5) searches pruning policies
on a few samples and penalises each policy by a structural-risk-minimization (SRM) bound on the gap
between its accuracy on those samples and on the data distribution. The paper's own expression is
not reproduced here; this module implements the textbook SRM bound for a countable class
(Shalev-Shwartz & Ben-David, *Understanding Machine Learning*, 2014, ch. 7: Theorem 7.4 with
singleton classes, and Hoeffding's inequality as in Corollary 4.6; Vapnik 1998):

The search space is nested by complexity. A policy h = (base, q) (:mod:`vlmprune.search.policy`)
with U components has complexity k = ||q||_1 (grid steps away from its base). The shell of
complexity k around one base holds S(U, k) policies, the number of integer vectors of L1 norm k:

    S(U, 0) = 1,    S(U, k) = sum_{i=1}^{min(U, k)} 2^i C(U, i) C(k - 1, i - 1)     (k >= 1)

(choose the i non-zero coordinates, their signs, and a composition of k into i positive parts).
Give h the prior weight  w(h) = 1 / (B (k + 1)(k + 2) S(U, k))  with B the number of bases;
the weights sum to 1 over the whole (infinite) space since sum_k 1/((k+1)(k+2)) = 1. For an
objective with values in an interval of width R, averaged over n i.i.d. samples, Hoeffding's
inequality and a union bound weighted by w give: with probability at least 1 - delta, for every h
at once,

    |true(h) - empirical(h)| <= R * sqrt( (ln B + ln((k+1)(k+2)) + ln S(U, k) + ln(2 / delta)) / (2 n) )

which is the penalty returned here: it grows with the complexity of the policy (the size of the
shell it lives in) and shrinks as 1 / sqrt(n). Maximising  empirical(h) - penalty(h)  maximises a
lower bound on the true objective, valid for the policy the search returns. The bound needs the
search samples to be independent of the class definition: the bases come from the calibration
data, never from the search samples.

**A variance-aware alternative** (``allocation.search.bound: bernstein``). The Hoeffding bound knows
only the range R, so it charges every policy of a shell alike, however little its predictions move.
Compare each policy h with its own base b on the same samples instead: the per-sample differences
d_i = v_i(h) - v_i(b) lie in [-R, R], and true(h) = true(b) + E[d]. The empirical Bernstein bound
(Maurer & Pontil, *Empirical Bernstein Bounds and Sample Variance Penalization*, COLT 2009,
Theorem 4, rescaled from [0, 1] to an interval of width 2R), with a union over the policies of
complexity k >= 1 weighted by  w(h) = 1 / (B k (k+1) S(U, k))  (summing to 1 again; a base, k = 0,
has d = 0 and needs no bound), gives with probability at least 1 - delta, for every such h at once,

    E[d] >= mean(d) - sqrt(2 V_n(d) L / n) - 14 R L / (3 (n - 1)),    L = ln(2 / (delta w(h)))

with V_n(d) the sample variance (divisor n - 1). :func:`bernstein_penalty` returns the variance
term  sqrt(2 V_n(d) L / n)  only, Maurer & Pontil's *sample variance penalization* (their section 4):
the last term depends on h only through L and, at the sample counts the search is for, is larger
than the objective itself (R = 1, n = 64, L about 20: 1.5), so the full bound is vacuous and the
penalty is a regulariser, as the Hoeffding bound is at weights below 1. What it adds: a policy whose
predictions differ from its base's on few samples, or by little, pays little, and one whose apparent
gain rests on large per-sample swings pays more; the winner's curse of a search (the best of many
noisy estimates looks better than it is) is largest for exactly those. Comparisons between bases
are left to their objectives: the choice of base is not charged, and on the offline ``vision_lm``
(``benchmarks/results/search_draws_vision_lm.md``) that uncharged choice, made on 64 samples, moved the
held-out gap more than the penalty did.
"""

from __future__ import annotations

import math
import statistics


def shell_size(dim: int, k: int) -> int:
    """S(U, k): how many integer vectors of dimension U have L1 norm exactly k."""
    if dim < 1 or k < 0:
        raise ValueError(f"need dim >= 1 and k >= 0, got dim={dim}, k={k}")
    if k == 0:
        return 1
    return sum(2 ** i * math.comb(dim, i) * math.comb(k - 1, i - 1) for i in range(1, min(dim, k) + 1))


def _log_shell(dim: int, complexity: int, n_bases: int) -> float:
    """ln B + ln S(U, k): the union over the bases and over the shell of complexity k."""
    if n_bases < 1:
        raise ValueError(f"n_bases must be >= 1, got {n_bases}")
    return math.log(n_bases) + math.log(shell_size(dim, complexity))


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def srm_penalty(n_samples: int, dim: int, complexity: int, n_bases: int = 1, delta: float = 0.05,
                value_range: float = 1.0) -> float:
    """R * sqrt((ln B + ln((k+1)(k+2)) + ln S(U, k) + ln(2/delta)) / (2 n)); see the module docstring."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    _check_delta(delta)
    if value_range < 0:
        raise ValueError(f"value_range must be >= 0, got {value_range}")
    k = complexity
    log_terms = _log_shell(dim, k, n_bases) + math.log((k + 1) * (k + 2)) + math.log(2.0 / delta)
    return value_range * math.sqrt(log_terms / (2.0 * n_samples))


def bernstein_penalty(differences, dim: int, complexity: int, n_bases: int = 1, delta: float = 0.05) -> float:
    """sqrt(2 V_n(d) L / n), L = ln(2 / delta) + ln B + ln(k (k+1)) + ln S(U, k): the variance term of
    the empirical Bernstein bound on E[d] for the per-sample differences ``d`` of a policy of
    complexity k from its base (see the module docstring); 0 for a base (k = 0)."""
    _check_delta(delta)
    d = [float(v) for v in differences]
    if len(d) < 2:
        raise ValueError(f"the Bernstein penalty needs per-sample values of at least 2 samples, got {len(d)}")
    if complexity == 0:
        return 0.0
    k = complexity
    log_terms = _log_shell(dim, k, n_bases) + math.log(k * (k + 1)) + math.log(2.0 / delta)
    return math.sqrt(2.0 * statistics.variance(d) * log_terms / len(d))
