"""Structured pruning: remove whole attention heads, FFN neurons (MBConv channels) and layers.

Methods (``pruning.method``), all in :func:`structured_prune`:

- ``mope``: MoPE-CLIP's module-wise pruning error (METHODS.md section 4), width then depth; the
  drop of a cross-modal metric (:mod:`~vlmprune.structured.mope`) or, for LLaMA-style causal LMs,
  the rise of the next-token loss (:mod:`~vlmprune.structured.mope_lm`);
- ``magnitude_structured``: the same modules ranked by weight norms;
- ``layer_drop``: evenly spaced residual layers removed, width kept.

Recovery by distillation from the dense teacher is in :mod:`vlmprune.structured.distill`.
"""

from vlmprune.registry import Registry
from vlmprune.structured.plan import StructuredSettings, structured_prune
from vlmprune.structured.surgery import apply_structure, count_parameters, current_structure

STRUCTURED: Registry[str] = Registry("structured pruning method")
for _name, _doc in {
    "mope": "module-wise pruning error (MoPE-CLIP), width then depth",
    "magnitude_structured": "weight-norm ranking of the same modules, width then depth",
    "layer_drop": "evenly spaced residual layers removed",
}.items():
    STRUCTURED.register(_name)(_doc)

__all__ = ["STRUCTURED", "StructuredSettings", "structured_prune", "apply_structure", "count_parameters",
           "current_structure"]
