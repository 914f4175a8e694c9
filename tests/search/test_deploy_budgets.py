"""int8 flash and SRAM budgets, screened before training like params (search/schema.py names
them; trainables/accounting.py counts them on the meta device)."""

from __future__ import annotations

import pytest

from search.schema import OBJECTIVE_MODES, budget_fields
from search.space import check_initial, dry_run
from search.spec import SpecError, parse_spec
from trainables.accounting import count

SPACE = {
    "name": "mcu",
    "data": {"name": "digits"},
    "objectives": {"val_accuracy": "max", "flash_bytes": "min"},
    "search": {"sampler": "random", "num_samples": 30, "seed": 0},
    "space": {"stem": {"width": {"int": [4, 32]}}, "num_stages": {"int": [1, 3]},
              "stages": {"width": {"int": [8, 64]}, "layers": {"int": [1, 3]}},
              "head": {"choice": [[], [64]]}},
}


def test_flash_and_sram_are_objectives_and_budgets_in_the_vocabulary():
    assert OBJECTIVE_MODES["flash_bytes"] == "min" and OBJECTIVE_MODES["sram_bytes"] == "min"
    assert budget_fields() == {"max_params": "nonzero_params",
                               "max_deploy_params": "deploy_params", "max_macs": "macs",
                               "max_flash_bytes": "flash_bytes", "max_sram_bytes": "sram_bytes",
                               "max_latency_ms": "latency_ms"}


def test_no_proposal_breaks_a_flash_or_sram_budget_and_some_are_refused():
    free = dry_run(parse_spec(SPACE), 30, input_shape=(1, 8, 8), num_classes=10)
    flash = sorted(p.accounting.flash_bytes for p in free.proposals)
    sram = sorted(p.accounting.sram_bytes for p in free.proposals)
    budget = {"max_flash_bytes": flash[len(flash) // 2], "max_sram_bytes": sram[-2]}
    tight = dry_run(parse_spec({**SPACE, "constraints": budget}), 10, input_shape=(1, 8, 8),
                    num_classes=10)
    assert tight.rejected > 0  # over-budget proposals were screened out, never trained
    for p in tight.proposals:
        assert p.accounting.flash_bytes <= budget["max_flash_bytes"]
        assert p.accounting.sram_bytes <= budget["max_sram_bytes"]
        again = count(p.arch)  # the screen's figures are the accounting's
        assert (again.flash_bytes, again.sram_bytes) == (p.accounting.flash_bytes,
                                                         p.accounting.sram_bytes)


def test_an_initial_point_over_the_flash_budget_names_the_excess(tmp_path):
    arch = tmp_path / "a.yaml"
    from trainables.arch import ArchConfig, StageConfig, StemConfig

    ArchConfig(in_channels=1, input_size=(8, 8), num_classes=10,
               stem=StemConfig(width=8), stages=(StageConfig(width=16, layers=1),)).dump(arch)
    flash = count(ArchConfig.load(arch)).flash_bytes
    spec = parse_spec({**SPACE, "constraints": {"max_flash_bytes": flash - 10},
                       "search": {**SPACE["search"], "initial": [str(arch)]}},
                      source=str(tmp_path / "s.yaml"))
    with pytest.raises(SpecError, match=r"\+10 bytes over constraints.max_flash_bytes"):
        check_initial(spec)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "1k"])
def test_a_bad_flash_budget_names_the_field(bad):
    with pytest.raises(SpecError, match=r"constraints.max_flash_bytes="):
        parse_spec({**SPACE, "constraints": {"max_flash_bytes": bad}})


TRANSFER = {
    "name": "transfer",
    "data": {"name": "cifar10"},
    "objectives": {"val_accuracy": "max", "deploy_params": "min"},
    "constraints": {"max_params": 200_000},
    "search": {"sampler": "random", "num_samples": 30, "seed": 0},
    "space": {"backbone": {"choice": ["none", "resnet18"]}, "stem": {"width": {"int": [8, 32]}},
              "num_stages": {"int": [1, 2]}, "stages": {"width": {"int": [16, 64]}},
              "head": {"choice": [[], [64]]}},
}


def test_a_frozen_trunk_counts_in_deploy_params_and_its_budget_refuses_it():
    """max_params bounds what trains (a frozen resnet18's head passes it); deploy_params counts
    every weight shipped, and max_deploy_params screens the 11M trunk out before training."""
    free = dry_run(parse_spec(TRANSFER), 16, input_shape=(3, 32, 32), num_classes=10)
    trunks = [p for p in free.proposals if p.arch.backbone is not None]
    scratch = [p for p in free.proposals if p.arch.backbone is None]
    assert trunks and scratch
    assert all(p.screened_params <= 200_000 < 11_000_000 < p.deploy_params for p in trunks)
    assert all(p.deploy_params == p.screened_params for p in scratch)
    text = free.text()  # the dry run shows both counts where they differ
    assert "deploy params (every weight shipped" in text
    assert f"{trunks[0].screened_params:>10,} {trunks[0].deploy_params:>11,}" in text

    budget = {**TRANSFER, "constraints": {"max_params": 200_000, "max_deploy_params": 1_000_000}}
    tight = dry_run(parse_spec(budget), 16, input_shape=(3, 32, 32), num_classes=10)
    assert tight.rejected > 0 and all(p.arch.backbone is None for p in tight.proposals)
    assert "deploy params" not in tight.text()  # nothing ships more than it trains


@pytest.mark.parametrize("bad", [0, -5, 1.5])
def test_a_bad_deploy_budget_names_the_field(bad):
    with pytest.raises(SpecError, match=r"constraints.max_deploy_params="):
        parse_spec({**TRANSFER, "constraints": {"max_deploy_params": bad}})
