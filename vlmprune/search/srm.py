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
"""

from __future__ import annotations

import math


def shell_size(dim: int, k: int) -> int:
    """S(U, k): how many integer vectors of dimension U have L1 norm exactly k."""
    if dim < 1 or k < 0:
        raise ValueError(f"need dim >= 1 and k >= 0, got dim={dim}, k={k}")
    if k == 0:
        return 1
    return sum(2 ** i * math.comb(dim, i) * math.comb(k - 1, i - 1) for i in range(1, min(dim, k) + 1))


def srm_penalty(n_samples: int, dim: int, complexity: int, n_bases: int = 1, delta: float = 0.05,
                value_range: float = 1.0) -> float:
    """R * sqrt((ln B + ln((k+1)(k+2)) + ln S(U, k) + ln(2/delta)) / (2 n)); see the module docstring."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if n_bases < 1 or value_range < 0:
        raise ValueError(f"need n_bases >= 1 and value_range >= 0, got {n_bases}, {value_range}")
    k = complexity
    log_terms = (math.log(n_bases) + math.log((k + 1) * (k + 2)) + math.log(shell_size(dim, k))
                 + math.log(2.0 / delta))
    return value_range * math.sqrt(log_terms / (2.0 * n_samples))
