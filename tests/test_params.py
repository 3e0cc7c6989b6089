"""params.yaml validation: bad values and unknown keys fail before any work, naming the field."""

from pathlib import Path

import pytest
import yaml

from params.schema import ParamsError, load_params, validate

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_params_and_presets_validate():
    assert load_params(ROOT / "params.yaml").pruning.sparsity == 0.5
    presets = sorted((ROOT / "params" / "presets").rglob("*.yaml"))
    assert presets, "no presets shipped"
    for preset in presets:
        load_params(preset)


def test_sparsity_out_of_range_names_field(tmp_path):
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, {"pruning": {"sparsity": 1.5}}))
    message = str(error.value)
    assert "pruning.sparsity = 1.5" in message and "less than 1" in message


def test_unknown_key_names_field(tmp_path):
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, {"pruning": {"sparsty": 0.5}}))
    assert "pruning.sparsty: unknown key" in str(error.value)


@pytest.mark.parametrize("section,key,value,expected", [
    ("pruning", "method", "obs", "magnitude, sparsegpt, wanda"),
    ("allocation", "method", "random", "ecoflap, owl, uniform"),
    ("pruning", "pattern", "3:2", "N:M"),
    ("calibration", "seed", -1, "greater than or equal to 0"),
    ("model", "device", "gpu", "cpu, auto, cuda"),
    ("scoring", "granularity", "layer", "'group' or 'tensor'"),
])
def test_bad_values_list_allowed(section, key, value, expected):
    with pytest.raises(ParamsError) as error:
        validate({section: {key: value}})
    assert f"{section}.{key}" in str(error.value) and expected in str(error.value)


def test_overrides_apply_and_validate(tmp_path):
    path = write(tmp_path, {"pruning": {"sparsity": 0.5}})
    params = load_params(path, ["pruning.sparsity=0.6", "pruning.method=wanda", "pruning.pattern=2:4"])
    assert params.pruning.sparsity == 0.6 and params.pruning.method == "wanda" and params.pruning.nm == (2, 4)
    with pytest.raises(ParamsError, match="pruning.sparsity"):
        load_params(path, ["pruning.sparsity=2"])


def test_cross_section_checks():
    with pytest.raises(ParamsError, match="needs scores"):
        validate({"allocation": {"method": "ecoflap"}, "scoring": {"method": "none"}})
    with pytest.raises(ParamsError, match="s_max"):
        validate({"allocation": {"s_max": 0.4}, "pruning": {"sparsity": 0.5}})


def test_forward_differences_need_the_block_cache_only_for_zeroth_order_scores():
    with pytest.raises(ParamsError, match="scoring.cache_inputs"):
        validate({"scoring": {"method": "zeroth_order", "difference": "forward", "cache_inputs": False}})
    for method in ("none", "first_order"):  # the setting is unused there: a sweep may switch the method alone
        raw = {"scoring": {"method": method, "difference": "forward"}, "allocation": {"method": "uniform"}}
        assert validate(raw).scoring.difference == "forward"


def test_first_order_gradient_norm_reaches_the_scorer_and_applies_to_the_grad_variant_only():
    from tasks.score import _scorer_options

    params = validate({"scoring": {"method": "first_order", "norm": "l2"}})
    assert _scorer_options(params, None, None) == {"checkpointing": True, "norm": "l2"}
    params = validate({"scoring": {"method": "first_order", "norm": "l2_group"}})
    assert _scorer_options(params, None, None) == {"checkpointing": True, "norm": "l2_group"}
    with pytest.raises(ParamsError, match="scoring.norm 'l2' applies to scoring.variant 'grad' only"):
        validate({"scoring": {"method": "first_order", "norm": "l2", "variant": "weight_grad"}})
    with pytest.raises(ParamsError, match="scoring.norm"):
        validate({"scoring": {"norm": "l3"}})


def test_l1_estimate_reaches_the_zeroth_order_scorer_for_the_grad_variant_only():
    from types import SimpleNamespace

    from tasks.score import _scorer_options

    params = validate({"scoring": {"l1_estimate": True, "cache_inputs": False}})
    loaded = SimpleNamespace(offload=None)
    assert _scorer_options(params, None, loaded) == {"granularity": "group", "n_directions": 1, "l1_estimate": True}
    with pytest.raises(ParamsError, match="scoring.l1_estimate applies to scoring.variant 'grad' only"):
        validate({"scoring": {"l1_estimate": True, "variant": "weight_grad"}})
    # unused by first-order scores (they take the L1 norm through scoring.norm): a sweep may switch the method alone
    assert validate({"scoring": {"method": "first_order", "l1_estimate": True}}).scoring.l1_estimate


def test_linear_head_needs_the_block_cache():
    with pytest.raises(ParamsError, match="scoring.head 'linear' needs scoring.cache_inputs"):
        validate({"scoring": {"method": "zeroth_order", "head": "linear", "cache_inputs": False}})
    with pytest.raises(ParamsError, match="scoring.head"):
        validate({"scoring": {"head": "quadratic"}})
    assert validate({"scoring": {"head": "linear"}}).scoring.head == "linear"


def test_layer_allocation_needs_a_per_layer_allocator_and_per_layer_scores():
    with pytest.raises(ParamsError, match="allocation.granularity 'layer' applies to allocation.method ecoflap or "
                                          "uniform, not 'owl'"):
        validate({"allocation": {"method": "owl", "granularity": "layer"}})
    with pytest.raises(ParamsError, match="set scoring.granularity: tensor, or use scoring.method: first_order"):
        validate({"allocation": {"granularity": "layer"}, "scoring": {"method": "zeroth_order"}})
    with pytest.raises(ParamsError, match="allocation.granularity"):
        validate({"allocation": {"granularity": "block"}})
    # uniform reads no scores: any scoring setting goes
    assert validate({"allocation": {"method": "uniform", "granularity": "layer"}}).allocation.granularity == "layer"
    for scoring in ({"method": "first_order"}, {"method": "zeroth_order", "granularity": "tensor"}):
        assert validate({"allocation": {"granularity": "layer"}, "scoring": scoring}).allocation.granularity == "layer"
