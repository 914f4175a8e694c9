"""The front table `run` and `pareto RUN_DIR` print, and the --json front: the search's own
objectives are shown, not only params and accuracy."""

from __future__ import annotations

from search.rundir.front import read_objectives
from search.rundir.progress import front_table

FRONT = [
    {"trial_key": "4", "nonzero_params": 9_431, "val_accuracy": 0.7131, "val_accuracy_se": 0.0064,
     "test_accuracy": 0.7131, "int8_val_accuracy": 0.7134, "int8_test_accuracy": 0.7117,
     "flash_bytes": 28_447, "sram_bytes": 17_664, "latency_ms": None, "arch": "sep|s18/2|gap"},
    {"trial_key": "13", "nonzero_params": 60_001, "val_accuracy": 0.7452,
     "val_accuracy_se": 0.0062, "test_accuracy": 0.7366, "int8_val_accuracy": 0.7434,
     "int8_test_accuracy": 0.7364, "flash_bytes": 68_459, "sram_bytes": 63_488,
     "arch": "std|s16|gap|h64", "initial": "archs/x.yaml"},
]


def test_the_table_shows_the_searchs_objectives():
    plain = front_table(FRONT).splitlines()
    assert "int8" not in plain[1] and "flash" not in plain[1]
    table = front_table(FRONT, ["int8_accuracy", "flash_bytes", "latency_ms"]).splitlines()
    head = table[1].split()
    assert head[:6] == ["nonzero_params", "val_acc", "+-se", "test_acc", "int8_val", "int8_test"]
    assert head[6:9] == ["flash_B", "lat_ms", "trial"]
    row4, row13 = table[2].split(), table[3].split()
    assert row4[4:8] == ["0.7134", "0.7117", "28,447", "-"]  # no latency measured: a dash
    assert row13[4:8] == ["0.7434", "0.7364", "68,459", "-"] and row13[8] == "13*"
    assert table[-1].startswith("* a network of search.initial")


def test_the_table_shows_deploy_params_where_a_frozen_trunk_ships_more_than_trains():
    same = [{**p, "deploy_params": p["nonzero_params"]} for p in FRONT]
    assert "deploy" not in front_table(same).splitlines()[1]
    trunk = [{**same[0], "deploy_params": 11_182_000}, same[1]]
    table = front_table(trunk).splitlines()
    assert table[1].split()[4] == "deploy"
    assert table[2].split()[4] == "11,182,000" and table[3].split()[4] == "60,001"


def test_the_objectives_come_from_the_run_dirs_spec(tmp_path):
    (tmp_path / "spec.yaml").write_text("name: x\nobjectives: {int8_accuracy: max, flash_bytes: min}\n")
    assert read_objectives(tmp_path) == ["int8_accuracy", "flash_bytes"]
    (tmp_path / "spec.yaml").unlink()  # an old hand-made run dir: the default objectives
    assert read_objectives(tmp_path) == ["val_accuracy", "nonzero_params"]
