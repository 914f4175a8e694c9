"""A finalized deployment front, shipped: every retrained member exported as the user exports it
(``sparse-search export RUN_DIR final/<member>-s<seed> --format onnx-int8``), its int8 test
accuracy re-measured from the exported file with ONNX Runtime and its weight bytes read from
the file's initializers, both compared with what the run recorded: the retraining's
``result.json`` (int8_test_accuracy, flash_bytes) and final-pareto.csv's row (the mean over
seeds). Nothing is compared by hand.

    .venv/bin/python bench/export_check.py RUN_DIR [RUN_DIR ...]

The data are the run's own (its spec.yaml, as export reads them). Prints one line per
retraining and per member, then one JSON line; exits 1 on any mismatch, 2 when a run dir has
no finalized int8 member.

Latest figures: docs/results.md, "MCU CIFAR-10" (the command there).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from search.cli.export import run_dir_data  # noqa: E402
from search.rundir.layout import FINAL_DIR, RESULT_JSON  # noqa: E402
from trainables.data import load_dataset  # noqa: E402
from trainables.deploy.quantize import evaluate_onnx, onnx_weight_bytes  # noqa: E402


def export(run_dir: Path, job: str, out: Path) -> None:
    """The CLI as a user runs it."""
    cmd = [sys.executable, "-m", "search.cli", "export", str(run_dir), f"{FINAL_DIR}/{job}",
           "--format", "onnx-int8", "-o", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-2000:]}")


def check_run(run_dir: Path, tmp: Path) -> dict:
    splits = load_dataset(run_dir_data(run_dir))
    with (run_dir / "final-pareto.csv").open(newline="") as f:
        rows = {r["trial_key"]: r for r in csv.DictReader(f)}
    per_member: dict[str, list[dict]] = {}
    for path in sorted((run_dir / FINAL_DIR).glob(f"*/{RESULT_JSON}")):
        rec = json.loads(path.read_text())
        m = rec.get("metrics", {})
        if rec.get("status") != "FINISHED" or "int8_test_accuracy" not in m:
            continue
        job = path.parent.name
        out = tmp / f"{run_dir.name}-{job}-int8.onnx"
        export(run_dir, job, out)
        acc = evaluate_onnx(out, splits.x_test, splits.y_test, splits.mean, splits.std)
        weights = onnx_weight_bytes(out).weights
        got = {"job": job, "trial_key": rec["trial_key"], "int8_test_accuracy": acc,
               "recorded_int8_test_accuracy": m["int8_test_accuracy"], "weight_bytes": weights,
               "recorded_flash_bytes": m.get("flash_bytes"), "sram_bytes": m.get("sram_bytes"),
               "file_bytes": out.stat().st_size}
        got["equal"] = acc == m["int8_test_accuracy"] and weights == m.get("flash_bytes")
        print(f"{run_dir.name} {job}: int8 test {acc:.4f} (recorded {m['int8_test_accuracy']:.4f})"
              f"  weights {weights:,} B (flash {m.get('flash_bytes'):,} B)"
              f"  {'equal' if got['equal'] else 'DIFFERENT'}", flush=True)
        per_member.setdefault(rec["trial_key"], []).append(got)
    members = []
    for key, seeds in per_member.items():
        row = rows.get(key, {})
        mean = statistics.fmean(s["int8_test_accuracy"] for s in seeds)
        listed = float(row["int8_test_accuracy_mean"]) if row.get("int8_test_accuracy_mean") else None
        flash = int(float(row["flash_bytes"])) if row.get("flash_bytes") else None
        equal = (all(s["equal"] for s in seeds) and listed is not None
                 and abs(mean - listed) < 1e-12 and all(s["weight_bytes"] == flash for s in seeds))
        members.append({"trial_key": key, "seeds": len(seeds), "int8_test_accuracy_mean": mean,
                        "final_pareto_int8_test_accuracy_mean": listed, "flash_bytes": flash,
                        "sram_bytes": seeds[0]["sram_bytes"],
                        "on_front": str(row.get("on_front")).lower() == "true", "equal": equal,
                        "retrainings": seeds})
        print(f"{run_dir.name} member {key}: int8 test {mean:.4f} over {len(seeds)} seed(s), "
              f"final-pareto.csv {listed}  flash {flash} B  {'equal' if equal else 'DIFFERENT'}",
              flush=True)
    if not members:
        raise SystemExit(2)
    return {"run_dir": str(run_dir), "members": members}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="export-check-") as d:
        runs = [check_run(r, Path(d)) for r in args.run_dirs]
    ok = all(m["equal"] for r in runs for m in r["members"])
    print(json.dumps({"bench": "export_check", "all_equal": ok, "runs": runs}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
