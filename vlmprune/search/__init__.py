"""EfficientLLaVA-style pruning-policy search (Liang et al., CVPR 2025; METHODS.md section 5).

- :mod:`.policy`: policies (per-component offsets on a base allocation) projected onto the exact budget;
- :mod:`.srm`: the structural-risk-minimization penalty (a generalization-gap bound);
- :mod:`.evolution`: the seeded evolutionary loop over an ``evaluate_many`` callable;
- :mod:`.objective`: the search objective (accuracy hook or minus loss) and dense-restoring candidate pruning.

A plain library: the Prefect fan-out and the MLflow log live in ``tasks/search.py``.
"""

from .evolution import Candidate, SearchConfig, SearchResult, evolve
from .objective import CandidatePruner, make_objective
from .policy import Policy, PolicySpace, components
from .srm import shell_size, srm_penalty

__all__ = ["Candidate", "CandidatePruner", "Policy", "PolicySpace", "SearchConfig", "SearchResult", "components",
           "evolve", "make_objective", "shell_size", "srm_penalty"]
