"""space.stages / space keys for the published network forms (order, transition, bottleneck,
shortcut_bn, stem.bn_act, final_bn_act): parsed as fixed or searched values, checked with
ArchConfig's own rules, and refused where no possible block uses them."""

from __future__ import annotations

import pytest

from search.spec import Choice, IntRange, SpecError, StagesSpace, parse_spec


def spec(space: dict):
    return parse_spec({"data": {"name": "digits"}, "space": space})


def test_defaults_are_todays_forms() -> None:
    s = spec({}).space
    assert (s.stages.order, s.stages.transition, s.stages.bottleneck, s.stages.shortcut_bn) == (
        "post", "auto", 0, True)
    assert s.final_bn_act is False and s.stem is not None and s.stem.bn_act is True


def test_published_forms_can_be_searched() -> None:
    s = spec({
        "block": {"choice": ["densenet", "sparsenet"]},
        "stem": {"width": 16, "bn_act": {"choice": [True, False]}},
        "stages": {"order": {"choice": ["post", "pre"]}, "transition": ["always", "always", "auto"],
                   "bottleneck": {"int": [0, 4], "step": 4}, "compression": {"choice": [0.5, 1.0]}},
        "num_stages": 3,
        "final_bn_act": {"choice": [False, True]},
    }).space
    assert s.stages.order == Choice(("post", "pre"))
    assert s.stages.transition == ("always", "always", "auto")
    assert isinstance(s.stages.bottleneck, IntRange) and (s.stages.bottleneck.lo, s.stages.bottleneck.hi) == (0, 4)
    assert s.final_bn_act == Choice((False, True))
    s = spec({"block": "residual", "stages": {"shortcut_bn": {"choice": [True, False]}}}).space
    assert s.stages.shortcut_bn == Choice((True, False))


@pytest.mark.parametrize(("space", "message"), [
    ({"block": "densenet", "stages": {"order": "bn-first"}}, "space.stages.order='bn-first' is invalid"),
    ({"block": "densenet", "stages": {"transition": "yes"}}, "space.stages.transition='yes' is invalid"),
    ({"block": "densenet", "stages": {"bottleneck": {"int": [0, 40]}}}, "space.stages.bottleneck"),
    ({"block": "residual", "stages": {"shortcut_bn": "no"}}, "space.stages.shortcut_bn='no' is invalid"),
    ({"final_bn_act": 1}, "space.final_bn_act=1 is invalid"),
    ({"stem": {"bn_act": "no"}}, "space.stem.bn_act='no' is invalid"),
    ({"block": "plain", "stages": {"order": "pre"}}, "space.stages.order='pre' is invalid"),
    ({"block": "residual", "stages": {"bottleneck": 4}}, "space.stages.bottleneck=4 is invalid"),
    ({"block": "densenet", "stages": {"shortcut_bn": False}}, "space.stages.shortcut_bn=False is invalid"),
    ({"block": "densenet", "stages": {"transition": "never", "compression": 0.5}},
     "space.stages.compression=0.5 is invalid"),
])
def test_bad_values_name_the_key(space: dict, message: str) -> None:
    with pytest.raises(SpecError) as e:
        spec(space)
    assert message in str(e.value)


def test_every_stage_config_field_has_a_space_key() -> None:
    from dataclasses import fields

    from trainables.arch import StageConfig

    keys = {f.name for f in fields(StagesSpace)} - {"growth"}
    assert {f.name for f in fields(StageConfig)} - {"block", "conv"} == keys
