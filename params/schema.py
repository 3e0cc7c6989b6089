"""The schema of ``params.yaml``: one pydantic model per section, unknown keys refused.

``load_params(path, overrides)`` reads the YAML file, applies ``section.key=value`` overrides
(as ``dvc exp run -S`` does) and validates everything before any work starts. A bad file raises
:class:`ParamsError`, whose message names each bad field, its value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmprune.adapters import ADAPTERS
from vlmprune.allocators import ALLOCATORS
from vlmprune.pruners import PRUNERS, parse_pattern
from vlmprune.scorers import SCORERS
from vlmprune.structured import STRUCTURED


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _keep_ratios(values: list[float], keep_all: bool) -> list[float]:
    """``values`` if every keep ratio is in (0, 1] (``keep_all``: 1, keeping everything, allowed) or (0, 1)."""
    bad = [r for r in values if not (0 < r <= 1 if keep_all else 0 < r < 1)]
    if bad:
        raise ValueError(f"keep ratios must be in (0, {'1]' if keep_all else '1)'}; got {bad}")
    return values


def _check_name(value: str | None, registry, field: str) -> str | None:
    if value is not None and value not in registry:
        raise ValueError(f"{field} {value!r} is not one of: {', '.join(registry.names())}")
    return value


class ModelParams(Section):
    family: str | None = Field(None, description="model family; detected from the model when omitted")
    id: str = Field("artifacts/prepare/model", description="Hugging Face model id or local directory")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto (cuda when available)")

    @field_validator("family")
    @classmethod
    def _family(cls, v):
        return _check_name(v, ADAPTERS, "model.family")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
            raise ValueError(f"device {v!r} is not one of: cpu, auto, cuda, cuda:N, mps")
        return v


class RuntimeParams(Section):
    """How the model is held while it is calibrated, pruned and evaluated (vlmprune/offload.py)."""

    offload: Literal["none", "cpu", "disk"] = Field(
        "none", description="none: the whole model on model.device; cpu: the model on the CPU, one block at a time "
                            "on model.device; disk: the blocks stay in the safetensors checkpoint, one at a time in "
                            "memory (causal_lm models)")
    offload_dir: str | None = Field(None, description="disk: working folder for pruned blocks (default "
                                                      "<artifacts>/.offload)")


class VisionLMPrepareParams(Section):
    """Training of the offline LLaVA-style model's projector (vision tower and SmolLM2 frozen)."""

    image_size: int = Field(128, ge=32, le=512, description="input size; EfficientNet gives ceil(size/32)^2 tokens")
    feature_grid: int | None = Field(None, ge=1, le=16, description="average-pool the feature map to this grid (null: as is)")
    feature_blocks: int | None = Field(None, ge=1, le=16, description="read the output of the first n of EfficientNet-"
                                       "lite0's 16 MBConv blocks (11: stride 16, ceil(size/16)^2 tokens of 112 "
                                       "channels); null: all blocks and the head")
    steps: int = Field(150, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0, le=1)
    train_examples: int | None = Field(2000, ge=1, description="seeded subset of the training split whose "
                                                                "visual tokens are cached (null: all)")
    token_drop: float = Field(0.0, ge=0, le=1, description="fraction of the training steps taken on the "
                              "token-dropped model (random visual tokens dropped after layer token_drop_k, keep "
                              "ratio drawn from token_drop_ratios): trains the projector for PAR; 0: never")
    token_drop_ratios: list[float] = Field([0.5, 0.25], min_length=1, description="keep ratios of the dropped steps, "
                                           "each in (0, 1)")
    token_drop_k: int = Field(2, ge=1, description="the layer after which tokens are dropped (PAR's par.k)")

    @field_validator("token_drop_ratios")
    @classmethod
    def _ratios_in_unit_interval(cls, value: list[float]) -> list[float]:
        return _keep_ratios(value, keep_all=False)


class PrepareParams(Section):
    """What the prepare stage builds when ``model.id`` is its output: ``dual_encoder`` (train the
    projection heads of the packaged towers, towers locked; the fields at this level) or ``vision_lm``
    (train the projector of EfficientNet-lite0 -> SmolLM2; ``prepare.vision_lm``)."""

    model: Literal["dual_encoder", "vision_lm"] = "dual_encoder"
    embed_dim: int = Field(256, ge=8, le=4096)
    image_size: int = Field(96, ge=32, le=512)
    epochs: int = Field(40, ge=1, le=1000)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0, le=1)
    seed: int = Field(0, ge=0)
    vision_lm: VisionLMPrepareParams = VisionLMPrepareParams()


# data field -> the data.name values that read it (checked when the field is not at its default)
DATA_FIELD_READERS = {
    "path": ("text_file", "image_folder"),
    "annotations": ("image_folder",),
    "hf_id": ("hf",),
    "split": ("hf",),
    "image_column": ("image_folder", "hf"),
    "label_column": ("image_folder", "hf"),
    "caption_column": ("image_folder", "hf"),
    "question_column": ("image_folder", "hf"),
    "answer_column": ("image_folder", "hf"),
    "text_column": ("hf",),
    "image_size": ("image_folder", "hf"),
}


class DataParams(Section):
    """Image sets (digits, fashion_mnist, image_folder, hf) for the image families; text corpora
    (wikipedia, text_file, hf) for the language families. ``seq_len``, ``eval_windows`` and
    ``stride`` concern text only; the column names and ``image_size`` concern image_folder and hf
    (see vlmprune/data/spec.py)."""

    name: Literal["digits", "fashion_mnist", "image_folder", "hf", "wikipedia", "text_file"] = "digits"
    test_fraction: float = Field(0.3, gt=0, lt=1)
    seed: int = Field(0, ge=0, description="seed of the train/held-out split")
    path: str | None = Field(None, description="text_file: the UTF-8 text file (its last test_fraction is held out); "
                                               "image_folder: the folder")
    annotations: str | None = Field(None, description="image_folder: the CSV/JSONL file (default: labels.csv, "
                                                      "labels.jsonl, captions.csv or captions.jsonl in the folder)")
    hf_id: str | None = Field(None, description="hf: a Hugging Face dataset id or a local dataset directory")
    split: str = Field("train", min_length=1, description="hf: the split to read")
    image_column: str = Field("image", min_length=1, description="image_folder/hf: the image column")
    label_column: str = Field("label", min_length=1, description="image_folder/hf: the class-name column")
    caption_column: str = Field("caption", min_length=1,
                                description="image_folder/hf: the optional calibration-caption column")
    question_column: str = Field("question", min_length=1,
                                 description="image_folder/hf: the optional per-example VQA question column "
                                             "(needs the answer column; image-to-text families)")
    answer_column: str = Field("answer", min_length=1,
                               description="image_folder/hf: the per-example VQA answer column (with the "
                                           "question column)")
    text_column: str = Field("text", min_length=1, description="hf: the text column of a text dataset")
    image_size: int = Field(224, ge=8, le=1024, description="image_folder/hf: images are resized and "
                                                             "centre-cropped to this square")
    seq_len: int = Field(512, ge=8, le=1_048_576, description="text: tokens per calibration and evaluation window")
    eval_windows: int | None = Field(40, ge=1, description="text: held-out windows evaluated (all when null)")
    stride: int | None = Field(None, ge=1, description="text: step between evaluation windows (null = seq_len)")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.name == "text_file" and not self.path:
            raise ValueError("data.name 'text_file' needs data.path: the UTF-8 text file to calibrate and evaluate on")
        if self.name == "image_folder" and not self.path:
            raise ValueError("data.name 'image_folder' needs data.path: the folder holding the images")
        if self.name == "hf" and not self.hf_id:
            raise ValueError("data.name 'hf' needs data.hf_id: a Hugging Face dataset id or a local dataset directory")
        for field, readers in DATA_FIELD_READERS.items():
            value = getattr(self, field)
            if self.name not in readers and value != type(self).model_fields[field].default:
                names = " or ".join(repr(r) for r in readers)
                raise ValueError(f"data.{field} is only read when data.name is {names} (data.name is {self.name!r}, "
                                 f"data.{field} is {value!r}): remove data.{field} or change data.name")
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"data.stride ({self.stride}) exceeds data.seq_len ({self.seq_len}): tokens between "
                             "windows would never be scored; lower data.stride")
        return self


class CalibrationParams(Section):
    n_samples: int = Field(128, ge=1, description="calibration examples for the fine (pruning) stage")
    batch_size: int = Field(32, ge=1, description="examples pushed through a block at once")
    seed: int = Field(0, ge=0)


class ScoringParams(Section):
    method: str = Field("zeroth_order", description="global importance scores per group: none, zeroth_order, first_order")
    variant: Literal["grad", "weight_grad", "weight_grad_sq"] = "grad"
    n_samples: int = Field(32, ge=1, description="scoring uses the first n_samples calibration examples")
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    cache_inputs: bool = Field(True, description="zeroth_order: run each perturbed forward from the perturbed "
                                                 "block on, the earlier blocks answering from a clean forward")
    checkpointing: bool = Field(True, description="first_order: activation checkpointing (recompute each block's "
                                                  "activations in the backward pass instead of storing them)")
    norm: Literal["l1", "l2", "l2_group"] = Field(
        "l1", description="first_order, variant grad: sum over batches of each tensor's gradient L1 norm (the "
                          "reference's GradOnly), of its L2 norm (what zeroth-order scores at tensor granularity "
                          "track, without their noise), or of the L2 norm of the whole group's gradient (l2_group: "
                          "what they track at group granularity, their default)")
    difference: Literal["central", "forward"] = Field(
        "central", description="zeroth_order: central (2 forwards per block, the reference) or forward "
                               "(1 forward per block, reuses the clean loss; needs cache_inputs)")
    granularity: Literal["group", "tensor"] = Field(
        "group", description="zeroth_order: perturb a whole group (block) along one direction, or each weight "
                             "tensor alone (the reference estimator; about 7x the forwards on a LLaMA block)")
    n_directions: int = Field(1, ge=1, description="zeroth_order: random directions per unit and batch, averaged "
                                                   "(the reference: 1)")
    head: Literal["exact", "linear"] = Field(
        "exact", description="zeroth_order: the loss of each perturbed forward computed in full (exact, the "
                             "reference), or linearised at the input of a language model's output head, so perturbed "
                             "forwards stop there (linear: needs cache_inputs and a family with an output head: "
                             "causal_lm, llava, blip2, vision_lm; vlmprune/scorers/zeroth_order.py)")
    l1_estimate: bool = Field(
        False, description="zeroth_order, variant grad: multiply each perturbed unit's score by the square root of "
                           "its weight count, so it estimates the gradient's L1 norm (first_order's default) rather "
                           "than its L2 norm: exact in expectation when the gradient's entries are spread like a "
                           "zero-mean normal; for allocation.granularity layer, where L2-type scores favour small "
                           "layers. Measured on SmolLM2 (README): better than without it, not as good as first-order "
                           "scores, since the gradients' tails differ between kinds of layer "
                           "(vlmprune/scorers/zeroth_order.py)")

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if v == "none":
            return v
        return _check_name(v, SCORERS, "scoring.method")

    @model_validator(mode="after")
    def _difference(self):
        # only zeroth-order scores read it, so a sweep may switch scoring.method without touching it
        if self.method == "zeroth_order" and self.difference == "forward" and not self.cache_inputs:
            raise ValueError("scoring.difference 'forward' needs scoring.cache_inputs: true (it reuses the clean "
                             "loss of the cached forward)")
        if self.method == "zeroth_order" and self.head == "linear" and not self.cache_inputs:
            raise ValueError("scoring.head 'linear' needs scoring.cache_inputs: true (it takes the loss gradient in "
                             "the cached clean forward)")
        if self.method == "zeroth_order" and self.l1_estimate and self.variant != "grad":
            raise ValueError(f"scoring.l1_estimate applies to scoring.variant 'grad' only (variant is "
                             f"{self.variant!r}; the others weigh each element already); remove scoring.l1_estimate "
                             "or set the variant to grad")
        if self.method == "first_order" and self.norm != "l1" and self.variant != "grad":
            raise ValueError(f"scoring.norm {self.norm!r} applies to scoring.variant 'grad' only (variant is "
                             f"{self.variant!r}); remove scoring.norm or set the variant to grad")
        return self


class OwlParams(Section):
    lam: float = Field(0.08, ge=0, lt=1)
    M: float = Field(5.0, gt=0)
    weighted: bool = Field(True, description="shift so the parameter-weighted mean equals the target "
                                             "(the reference's plain mean over groups: false)")


class SearchParams(Section):
    """allocation.method: search (EfficientLLaVA-style policy search, vlmprune/search/)."""

    n_samples: int = Field(64, ge=1, description="search samples, drawn from the training split with sample_seed")
    sample_seed: int = Field(1, ge=0, description="seed of the search samples; must differ from calibration.seed")
    objective: Literal["accuracy", "probability", "loss"] = Field(
        "probability", description="correct-class probability or accuracy, zero-shot (dual_encoder), or minus the "
                                   "loss; accuracy saturates at 1 on the search samples (benchmarks/results/search.md)")
    granularity: Literal["tower", "group"] | Annotated[int, Field(ge=1)] = Field(
        4, description="one search variable per tower, per group, or per n consecutive groups of a tower")
    bases: list[Literal["uniform", "ecoflap"]] = Field(["uniform", "ecoflap"], min_length=1,
                                                       description="allocations the search starts from")
    step: float = Field(0.025, gt=0, le=0.5, description="grid step of the per-component sparsity offsets")
    rounds: int = Field(6, ge=1)
    population: int = Field(8, ge=1, description="candidates per round")
    max_evaluations: int = Field(40, ge=1, description="evaluation budget (candidates pruned and scored)")
    max_seconds: float | None = Field(None, gt=0, description="wall-time budget, checked between rounds")
    penalty: float = Field(1.0, ge=0, description="weight lambda of the SRM generalization-gap bound subtracted from "
                                                  "the objective: 1 = the bound (a guarantee), 0 = off, between = a "
                                                  "regulariser of the bound's shape, no longer a bound "
                                                  "(true/false read as 1/0)")
    delta: float = Field(0.05, gt=0, lt=1, description="confidence of the SRM bound (holds with prob. 1 - delta)")
    bound: Literal["hoeffding", "bernstein"] = Field(
        "hoeffding", description="the SRM penalty: hoeffding (the bound for the objective's range, alike for every "
                                 "policy of a complexity) or bernstein (the variance term of the empirical Bernstein "
                                 "bound on each policy's per-sample differences from its base; needs per-sample "
                                 "values: objective accuracy or probability, or loss on a language-model family; "
                                 "vlmprune/search/srm.py)")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1, description="search samples per forward")
    calibration_samples: int | None = Field(None, ge=1, description="prune candidates on the first n calibration "
                                                                    "samples (all when null)")
    workers: int = Field(1, ge=1, le=64, description="model copies evaluating candidates in parallel (in a flow)")


class AllocationParams(Section):
    method: str = "ecoflap"
    s_max: float | None = Field(None, gt=0, lt=1, description="ecoflap: largest group sparsity (default target + 0.1)")
    granularity: Literal["group", "layer"] = Field(
        "group", description="ecoflap: share the budget between groups (blocks, the reference's setting) or between "
                             "single layers, each with its own score, size, floor and cap (METHODS.md section 2: "
                             "'the granularity may also be a single layer'); layer needs per-layer scores. Measured "
                             "(README, Results): better than group on SmolLM2 with first-order scores, worse on the "
                             "default dual encoder, and worse than uniform with zeroth-order tensor scores (with "
                             "scoring.l1_estimate: 0.92x-1.7x uniform Wanda's perplexity in two draws)")
    owl: OwlParams = OwlParams()
    search: SearchParams = SearchParams()

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if v == "search":
            return v
        return _check_name(v, ALLOCATORS, "allocation.method")


class SparseGPTParams(Section):
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0, le=1)


class PruningParams(Section):
    method: str = "wanda"
    sparsity: float = Field(0.5, ge=0, lt=1, description="target fraction of prunable weights set to zero")
    pattern: str = Field("unstructured", description="unstructured or N:M (2:4, 4:8)")
    towers: list[str] | None = Field(None, description="towers to prune; all when omitted")
    include: list[str] = Field(default_factory=list, description="fnmatch patterns of layer names to prune")
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of layer names to keep dense")
    sparsegpt: SparseGPTParams = SparseGPTParams()

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if v in STRUCTURED:  # structured pruning (params.structured, tasks/structured.py)
            return v
        if v not in PRUNERS:
            raise ValueError(f"pruning.method {v!r} is not one of: {', '.join(PRUNERS.names() + STRUCTURED.names())}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        parse_pattern(v)
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


class EvaluationParams(Section):
    batch_size: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1, description="cap on held-out examples (all when omitted)")


class TrackingParams(Section):
    enabled: bool = True
    experiment: str = Field("vlmprune", min_length=1)
    model_name: str = Field("vlmprune-dual-encoder", min_length=1, description="registered model name")
    alias: str = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    uri: str | None = Field(None, description="tracking URI; default sqlite:///<repo>/mlflow.db or $MLFLOW_TRACKING_URI")


class ParParams(Section):
    """PAR token and layer pruning with a meta-router (stages train_router, evaluate_tokens; vlmprune/par/)."""

    enabled: bool = Field(False, description="run the train_router and evaluate_tokens stages (else they write a "
                                             "'skipped' meta)")
    model: Literal["dense", "pruned"] = Field(
        "dense", description="the model the router is trained and evaluated on, its own full outputs the teacher: "
                             "dense (model.id) or pruned (the prune stage's artifacts/prune/model; the register "
                             "stage then attaches the router to the registered model as router/)")
    k: int = Field(2, ge=1, description="visual tokens are dropped, and the router reads h_k, after the first k layers")
    token_ratios: list[float] = Field([1.0, 0.5, 0.25], min_length=1,
                                      description="visual-token keep ratios r (keeps floor(n r) tokens)")
    layer_ratios: list[float] = Field([1.0, 0.75, 0.5], min_length=1,
                                      description="decoder-layer keep ratios r (runs floor(L r) layers)")
    router_width: int = Field(128, ge=4, le=8192)
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(16, ge=1)
    token_loss: Literal["straight_through", "contributions"] = Field(
        "straight_through", description="how the router's token head learns: straight_through (KL through "
        "straight-through masks) or contributions (rank tokens like their measured contributions; better with "
        "many visual tokens, benchmarks/results/router_training*.md)")
    token_subsets: int = Field(32, ge=2, description="contributions: keep-sets measured per training image")
    token_sets: Literal["random", "spread"] = Field(  # the keys of vlmprune.par.contributions.KEEP_SETS (tested)
        "random", description="contributions: the keep-sets measured, uniformly random or the spread prior's "
        "keep-set with random swaps (vlmprune/par/contributions.py; pair with par.spread > 0: the router then "
        "learns what to change in the prior's keep-set, README)")
    spread: float = Field(0.0, ge=0, description="weight of the spatial-spread prior (ordered dithering over the visual "
                                                 "token grid, vlmprune/par/spread.py) added to the router's standardised "
                                                 "token scores; > 0 adds the policies router+spread and dither (the prior "
                                                 "alone) to evaluate_tokens; 1.0 helped with 196 tokens (README)")
    train_samples: int = Field(256, ge=1, description="unlabelled training-split images the router learns from")
    eval_samples: int | None = Field(200, ge=1, description="held-out images per operating point (all when null)")
    latency_repeats: int = Field(10, ge=1, description="timed runs per operating point (median reported)")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads while timing (null = unchanged)")
    seed: int = Field(0, ge=0)

    @field_validator("token_ratios", "layer_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        _keep_ratios(v, keep_all=True)
        if len(set(v)) != len(v):
            raise ValueError(f"keep ratios must be distinct; got {v}")
        return v


class DistillParams(Section):
    """Optional recovery of a structurally pruned model by distillation from the dense teacher (image-text:
    embedding and similarity loss, pruned towers trained; causal LM: next-token KL + hidden-state MSE of the kept
    layers, all weights trained; vlmprune.structured.distill)."""

    enabled: bool = False
    n_samples: int = Field(512, ge=3, description="training-split pairs (causal LM: windows of data.seq_len tokens) "
                                                  "drawn with seed (train + validation)")
    seed: int = Field(1, ge=0, description="draw and batch order; differs from calibration.seed by default")
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(32, ge=2)
    eval_every: int = Field(10, ge=1, description="steps between validation losses")
    patience: int = Field(5, ge=1, description="validations without improvement before stopping early")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature term (causal LM: hidden-state MSE over "
                                                        "the teacher's mean square, summed over the kept layers)")
    logit_weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)


class StructuredParams(Section):
    """Structured pruning (pruning.method mope, magnitude_structured or layer_drop): width, then depth."""

    width_ratio: float = Field(0.5, gt=0, le=1, description="heads and FFN neurons kept per layer")
    depth_ratio: float = Field(1.0, gt=0, le=1, description="layers kept per tower (residual layers only are removed)")
    ffn_group: float = Field(0.0625, gt=0, le=1, description="fraction of a layer's FFN width scored and removed together")
    metric: Literal["auto", "accuracy", "retrieval", "loss", "lm_loss"] = Field(
        "auto", description="MoPE: the metric whose drop is scored: accuracy, retrieval or loss (cross-modal), lm_loss "
                            "(causal LMs: the next-token loss); auto: lm_loss for a causal LM, accuracy otherwise")
    n_samples: int = Field(64, ge=2, description="MoPE: first calibration pairs used for scoring")
    max_rows: int = Field(512, ge=1, description="MoPE: rows (candidates x samples) per batched forward")
    distill: DistillParams = DistillParams()


class RunParams(Section):
    artifacts: str = Field("artifacts", description="directory of the stage artifacts")
    model: ModelParams = ModelParams()
    runtime: RuntimeParams = RuntimeParams()
    prepare: PrepareParams = PrepareParams()
    data: DataParams = DataParams()
    calibration: CalibrationParams = CalibrationParams()
    scoring: ScoringParams = ScoringParams()
    allocation: AllocationParams = AllocationParams()
    pruning: PruningParams = PruningParams()
    evaluation: EvaluationParams = EvaluationParams()
    tracking: TrackingParams = TrackingParams()
    structured: StructuredParams = StructuredParams()
    par: ParParams = ParParams()

    @model_validator(mode="after")
    def _consistent(self):
        if self.scoring.n_samples > self.calibration.n_samples:
            raise ValueError(
                f"scoring.n_samples ({self.scoring.n_samples}) exceeds calibration.n_samples "
                f"({self.calibration.n_samples}): scoring draws from the calibration sample"
            )
        if self.allocation.method == "ecoflap" and self.scoring.method == "none":
            raise ValueError("allocation.method 'ecoflap' needs scores: set scoring.method to zeroth_order or first_order")
        if self.allocation.granularity == "layer":
            if self.allocation.method not in ("ecoflap", "uniform"):
                raise ValueError(f"allocation.granularity 'layer' applies to allocation.method ecoflap or uniform, not "
                                 f"{self.allocation.method!r} (its allocation is per group): set allocation.granularity: "
                                 "group")
            if (self.allocation.method == "ecoflap" and self.scoring.method == "zeroth_order"
                    and self.scoring.granularity == "group"):
                raise ValueError("allocation.granularity 'layer' needs a score per layer, but zeroth-order scores at "
                                 "scoring.granularity 'group' perturb whole groups (their layer scores are a split by "
                                 "size): set scoring.granularity: tensor, or use scoring.method: first_order")
        if self.allocation.method == "search":
            search = self.allocation.search
            if "ecoflap" in search.bases and self.scoring.method == "none":
                raise ValueError("allocation.search.bases includes 'ecoflap', which needs scores: set scoring.method "
                                 "to zeroth_order or first_order, or allocation.search.bases: [uniform]")
            if self.pruning.pattern != "unstructured":
                raise ValueError(f"allocation.method 'search' needs pruning.pattern: unstructured (an N:M pattern "
                                 f"{self.pruning.pattern!r} fixes every layer's sparsity)")
            if search.sample_seed == self.calibration.seed:
                raise ValueError(f"allocation.search.sample_seed ({search.sample_seed}) equals calibration.seed: the "
                                 "search samples would repeat the calibration samples; choose another sample_seed")
            if search.bound == "bernstein" and min(search.population, search.max_evaluations) < len(search.bases):
                raise ValueError(f"allocation.search.bound 'bernstein' compares each policy with its base, so every "
                                 f"base must be evaluated in round 0: allocation.search.population and "
                                 f"max_evaluations must be >= {len(search.bases)} (the number of bases)")
        if self.pruning.method in STRUCTURED:
            st = self.structured
            if self.pruning.method == "layer_drop" and st.width_ratio < 1:
                raise ValueError(f"pruning.method 'layer_drop' removes whole layers only but structured.width_ratio is "
                                 f"{st.width_ratio}: set it to 1.0, or use mope / magnitude_structured")
            if self.pruning.method == "mope" and st.n_samples > self.calibration.n_samples:
                raise ValueError(f"structured.n_samples ({st.n_samples}) exceeds calibration.n_samples "
                                 f"({self.calibration.n_samples}): MoPE scores on the calibration pairs")
        drop = self.prepare.vision_lm
        if self.par.enabled and drop.token_drop > 0 and drop.token_drop_k != self.par.k:
            raise ValueError(f"prepare.vision_lm.token_drop_k ({drop.token_drop_k}) differs from par.k ({self.par.k}): "
                             "the projector would be trained to drop tokens after another layer than PAR drops them; "
                             "set both to the same layer")
        s_max = self.allocation.s_max
        if s_max is not None and s_max < self.pruning.sparsity:
            raise ValueError(
                f"allocation.s_max ({s_max}) is below pruning.sparsity ({self.pruning.sparsity}): "
                "no allocation can reach the target; raise allocation.s_max"
            )
        return self


class ParamsError(ValueError):
    """A params file that does not validate; the message lists every bad field."""


def _format(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid parameter(s)"]
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key (value {e['input']!r}); check the spelling against params/schema.py")
        else:
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {field} = {e['input']!r}: {message}")
    return "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2:4`` as the base-60 integer 124; like YAML 1.2 (and DVC), keep it a string."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if not (tag.endswith(":int") and ":" in regexp.pattern.replace("tag:", ""))]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _parse_scalar(text: str):
    return read_yaml(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (YAML scalars) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return data


def validate(data: dict, source: str = "params") -> RunParams:
    try:
        return RunParams.model_validate(data)
    except ValidationError as error:
        raise ParamsError(_format(error, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> RunParams:
    """Read, override and validate a params file."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found")
    try:
        data = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(data, overrides or [])
    return validate(data, str(path))
