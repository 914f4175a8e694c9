"""A newcomer's first commands, through the installed console script, in empty folders.

Every shipped space (spaces/*.yaml, spaces/studies/*.yaml) on this CPU-only machine: without
its data it exits 2 before Ray starts and creates nothing; a dry run needs no data; with its
data (--data-path) its first proposal trains (in-process: preflight, proposal, one step on a
slice). Through the console script with Ray, on three representative spaces (the quickstart,
an image folder, cifar10.yaml with ``resources: auto``): the first trial starts within 60 s,
then Ctrl-C or SIGTERM: 130, resumable. Exit codes of every command; SIGTERM and resume;
three searches side by side in one folder.

The real datasets come from ../shared/datasets when that folder exists (passed explicitly
with --data-path); CIFAR-100 and the image folders are small synthetic files in the real
formats, written here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sigint
import torch

pytestmark = pytest.mark.ray  # the console-script searches start Ray


REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("sparse-search"))
SHARED = REPO.parent / "shared" / "datasets"
SPACES = sorted((REPO / "spaces").glob("*.yaml")) + sorted((REPO / "spaces/studies").glob("*.yaml"))
NEEDS_DATA = [p for p in SPACES if p.stem != "quickstart"]  # quickstart: the embedded digits
QUICK = """
name: side-by-side
data: {name: digits, val_fraction: 0.2, subset: 300}
constraints: {max_params: 2000}
search: {sampler: random, num_samples: 3, max_concurrent: 1, seed: 0}
train: {epochs: 1, batch_size: 64, optimizer: adamw, lr: 0.02}
space:
  stem: {width: {int: [2, 8]}}
  num_stages: 1
  stages: {width: {int: [4, 16]}, layers: 1}
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture()
def newcomer(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An empty working folder and an environment whose dataset cache is empty and offline
    (the mirror is a closed loopback port: no traffic leaves the machine)."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "SPARSE_SEARCH_DATA": str(tmp_path / "cache"),
           "SPARSE_SEARCH_DATA_MIRROR": f"http://127.0.0.1:{_closed_port()}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return work, env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------- no data
@pytest.mark.parametrize("space", NEEDS_DATA, ids=[p.stem for p in NEEDS_DATA])
def test_without_data_exit_2_fast_and_nothing_created(space, newcomer):
    work, env = newcomer
    # Fast = before Ray starts: a Ray started here would create its session folder under
    # RAY_TMPDIR. (A wall-clock bound flaked on a loaded machine: 5.4 s against 5 s.)
    ray_tmp = work.parent / "ray-tmp"
    done = _run(["run", str(space)], work, {**env, "RAY_TMPDIR": str(ray_tmp)}, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), done.stderr  # one line, no traceback
    spec_text = space.read_text()
    if "imagefolder" in spec_text:
        assert "no such directory" in err[0]
    else:
        # names the dataset, the cache folder and both ways to supply it
        assert "sparse-search data import" in err[0] and "--data-path" in err[0]
        assert env["SPARSE_SEARCH_DATA"] in err[0]
    assert not ray_tmp.exists(), f"{space.name}: Ray was started before the data check"
    assert sorted(os.listdir(work)) == []  # no run dir, no mlflow.db, no mlruns/


@pytest.mark.parametrize("space", SPACES, ids=[p.stem for p in SPACES])
def test_dry_run_needs_no_data(space, newcomer):
    work, env = newcomer
    done = _run(["run", str(space), "--dry-run", "5", "--json"], work, env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["feasible"] >= 1
    assert report["feasible"] == 5 or report["exhausted"]
    assert sorted(os.listdir(work)) == []


def test_dry_run_of_a_space_smaller_than_asked_lists_it_all(newcomer):
    work, env = newcomer
    space = REPO / "spaces/studies/sparsenet-vs-densenet.yaml"  # holds 2 configs
    done = _run(["run", str(space), "--dry-run", "20"], work, env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the space holds only 2 distinct configs (asked for 20); all of them:" in done.stdout
    rows = done.stdout.split("all of them:")[1].strip().splitlines()
    assert len(rows) == 2 and {"densenet" in r or "dense" in r for r in rows}


def test_binary_spec_is_exit_2_naming_the_file(newcomer):
    work, env = newcomer
    bad = work.parent / "bad.yaml"
    bad.write_bytes(b"name: x\n\xff\xfe\x00\x01 binary")
    done = _run(["run", str(bad)], work, env)
    assert done.returncode == 2 and f"error: {bad}: not a UTF-8 text file" in done.stderr
    assert "Traceback" not in done.stderr and sorted(os.listdir(work)) == []


# ---------------------------------------------------------------------- resources
def test_a_trial_no_node_can_hold_is_exit_2_naming_what_was_asked(newcomer):
    work, env = newcomer
    spec = work.parent / "big.yaml"
    spec.write_text(QUICK + "resources: {cpu: 64, gpu: 0.25}\n")
    done = _run(["run", str(spec)], work, env)
    assert done.returncode == 2, done.stderr
    msg = done.stderr.strip()
    assert msg.startswith(f"error: {spec}: resources={{cpu: 64, gpu: 0.25}} per trial is more "
                          "than any node has (this machine: ")
    assert "resources: auto" in msg and sorted(os.listdir(work)) == []


# ---------------------------------------------------------------------- first trial
def _synthetic_npz(path: Path, classes: int, shape: tuple[int, ...], n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
             y_train=np.arange(n_train) % classes,
             x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
             y_test=np.arange(n_test) % classes)


def _image_folder(root: Path, classes: int, side: int, per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(1, per_class // 2))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(d / f"{i}.png")


def _data_for(space: Path, where: Path) -> Path | None:
    """The --data-path that gives ``space`` its data (None: the embedded digits need none);
    skips the test when the real dataset is not in ../shared/datasets."""
    from search.spec import load_spec

    data = load_spec(space).data
    if data.name == "digits":
        return None
    if data.name == "cifar100":
        path = where / "cifar100.npz"
        _synthetic_npz(path, 100, (32, 32, 3), 600, 200)
        return path
    if data.name == "imagefolder":
        path = where / "folder"
        _image_folder(path, data.num_classes or 6, 32, 12)
        return path
    path = SHARED / f"{data.name}.npz"
    if not path.is_file():
        pytest.skip("the real dataset is not in ../shared/datasets")
    return path


def _wait_for_trial_dir(work: Path, proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until Ray made the first trial's folder (the trial started), or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if any(work.glob("runs/*/ray/trial_*")):
            return time.monotonic() - start
        if proc.poll() is not None:
            return None
        time.sleep(0.25)
    return None


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's `cmd &` or nohup starts it


@contextlib.contextmanager
def _search(args: list[str], work: Path, env: dict[str, str], *,
            sigint_ignored: bool = False) -> Iterator[subprocess.Popen]:
    """A search in its own process group; whatever is left of it is killed at the end."""
    out = open(work.parent / "search.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([CLI, *args], cwd=work, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_ignore_sigint if sigint_ignored else sigint.interactive)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()


@pytest.mark.parametrize("space", SPACES, ids=[p.stem for p in SPACES])
def test_with_its_data_the_first_proposal_trains(space, tmp_path):
    """What the first trial of every shipped space does, in-process: the spec parses with
    --data-path, the preflight probes the data and plans the resources (no Ray for a local
    search), the first screened proposal builds and one optimizer step runs on a slice of
    the data (the console script's own start is proven on three spaces below)."""
    from search.run.preflight import absolute_data_path, preflight
    from search.space import Proposer, SearchSpace
    from search.spec import load_spec
    from trainables.data import load_dataset, probe_dataset
    from trainables.train import fit
    from trainables.trial import seeded_model

    data = _data_for(space, tmp_path)
    spec = absolute_data_path(load_spec(space, data_path=None if data is None else str(data)))
    checked = preflight(spec, address=None, tracking_uri=None, mlflow=False)
    assert checked.plan.line.startswith("resources: ")
    probe_dataset(spec.data)  # as the preflight did: present, readable, its shape
    # A slice: 8 images for training (one batch), 4 for validation, 4 for test.
    splits = load_dataset(spec.data.replace(subset=12, val_fraction=1 / 3, test_subset=4))
    space_ = SearchSpace(spec, input_shape=splits.input_shape, num_classes=splits.num_classes)
    proposer = Proposer(space_, sampler=spec.search.sampler, seed=spec.search.seed,
                        max_rejects=spec.search.max_rejects)
    _, proposal = proposer.ask()
    assert proposal.feasible and proposal.arch is not None, proposal.error
    if spec.search.initial:  # a seeded space trains its first seed first
        assert proposal.initial == spec.search.initial[0].label
    cfg = proposal.train.replace(epochs=1, prune_rounds=0, batch_size=len(splits.y_train),
                                 eval_batch_size=64, threads=1, tta="none")
    model = seeded_model(proposal.arch, splits, cfg)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    result = fit(model, splits, cfg, device="cpu")
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # it stepped
    assert math.isfinite(result.metrics["train_loss"]) and 0 <= result.metrics["val_accuracy"] <= 1


@pytest.mark.parametrize("space", ["quickstart", "intel-scenes"])
def test_the_console_script_starts_a_first_trial_and_ctrl_c_exits_130(space, newcomer):
    """Through the console script, with Ray: the embedded-data quickstart and an image-folder
    space (cifar10.yaml with ``resources: auto`` is the next test)."""
    work, env = newcomer
    path = REPO / "spaces" / f"{space}.yaml"
    data = _data_for(path, work.parent)
    args = ["run", str(path), "--no-mlflow"] + ([] if data is None else ["--data-path", str(data)])
    with _search(args, work, env) as proc:
        took = _wait_for_trial_dir(work, proc, timeout=60)
        log = (work.parent / "search.log").read_text()
        assert took is not None, f"no trial started in 60 s:\n{log[-3000:]}"
        assert "resources: " in log.splitlines()[0]  # the plan, in one line, at start
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130
    log = (work.parent / "search.log").read_text()
    assert "interrupted: continue with `sparse-search resume " in log
    assert "Traceback" not in log and "absl" not in log.lower()


def test_cifar10_auto_resources_plan_cpu_trials_here(newcomer):
    work, env = newcomer
    if not (SHARED / "cifar10.npz").is_file():
        pytest.skip("the real dataset is not in ../shared/datasets")
    with _search(["run", str(REPO / "spaces/cifar10.yaml"), "--data-path",
                  str(SHARED / "cifar10.npz"), "--no-mlflow"], work, env) as proc:
        assert _wait_for_trial_dir(work, proc, timeout=60) is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 130
    first = (work.parent / "search.log").read_text().splitlines()[0]
    cpus = len(os.sched_getaffinity(0))
    per = max(1, cpus // 4)  # max_concurrent 4 share this machine's CPUs
    assert first.startswith(f"resources: auto -> {per} CPU{'s' if per > 1 else ''} per trial, "
                            "no GPU (none found)"), first


# ---------------------------------------------------------------------- signals and resume
def test_sigterm_exits_130_and_the_search_resumes_with_mlflow_closed(newcomer):
    # (SIGINT: every test_with_its_data_the_first_trial_starts_within_60_s case sends it.)
    # Started with SIGINT ignored, as a shell's `sparse-search run ... &` or nohup starts it:
    # SIGTERM, which the CLI turns into Ctrl-C, must stop it all the same.
    sig = signal.SIGTERM
    from mlflow.tracking import MlflowClient

    work, env = newcomer
    spec = work.parent / "quick.yaml"
    spec.write_text(QUICK.replace("num_samples: 3", "num_samples: 6"))
    with _search(["run", str(spec)], work, env, sigint_ignored=True) as proc:
        assert _wait_for_trial_dir(work, proc, timeout=120) is not None
        proc.send_signal(sig)
        assert proc.wait(timeout=180) == 130
    log = (work.parent / "search.log").read_text()
    line = next(ln for ln in log.splitlines() if ln.startswith("interrupted: continue with"))
    run_dir = line.split("`sparse-search resume ")[1].rstrip("`")
    assert "Traceback" not in log and "Stop signal received" not in log
    assert json.loads((Path(run_dir) / "outcome.json").read_text())["complete"] is False
    done = _run(["resume", run_dir, "--json"], work, env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["trials"] == 6
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert Counter(r.info.status for r in runs) == Counter({"FINISHED": 7})  # parent + 6


def test_three_searches_side_by_side_in_one_folder_all_recorded(newcomer):
    from mlflow.tracking import MlflowClient

    work, env = newcomer
    spec = work.parent / "quick.yaml"
    spec.write_text(QUICK)
    procs = [subprocess.Popen([CLI, "run", str(spec), "--json", "--seed", str(i)], cwd=work,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for i in range(3)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "warning: MLflow" not in err and "error:" not in err
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("side-by-side")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sparse_search.role") == "search"]
    assert len(parents) == 3 and len(runs) == 3 + 3 * 3
    assert Counter(r.info.status for r in runs) == Counter({"FINISHED": 12})
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 3


# ---------------------------------------------------------------------- exit codes
def test_exit_codes_of_every_command(newcomer):
    work, env = newcomer
    arch = REPO / "spaces/archs/mnist-1k.yaml"
    digits = work.parent / "digits.yaml"
    digits.write_text(arch.read_text().replace("input_size: [28, 28]", "input_size: [8, 8]")
                      .replace("padding: valid", "padding: same"))
    # Independent commands, three at a time (each is mostly its own imports): the exit codes.
    expected = [
        (["summarize", str(arch)], 0),
        (["summarize", str(work / "none.yaml")], 2),
        (["train", str(arch), "--data", "nope"], 2),
        (["train", str(arch), "--data", "digits"], 2),  # a 28x28 net on 8x8 digits
        (["train", str(digits), "--data", "digits", "--epochs", "1", "--threads", "1"], 0),
        (["resume", str(work / "no-run")], 2),
        (["sync", str(work)], 2),
        (["pareto"], 2),  # no search in ./mlflow.db
        (["export", "0" * 32, "--format", "onnx", "-o", "m.onnx"], 2),
        (["run", str(REPO / "spaces/quickstart.yaml"), "--num-samples", "0"], 2),
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda a: _run(a[0], work, env), expected))
    for (args, code), res in zip(expected, done, strict=True):
        assert res.returncode == code, (args, res.returncode, res.stderr[-2000:])
    # a search and what reads it back
    spec = work.parent / "quick.yaml"
    spec.write_text(QUICK)
    done = _run(["run", str(spec), "--json"], work, env)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = json.loads(done.stdout.strip().splitlines()[-1])["run_dir"]
    assert _run(["pareto", "--json"], work, env).returncode == 0
    assert _run(["sync", run_dir], work, env).returncode == 0
    front = json.loads(_run(["pareto", "--json"], work, env).stdout)["front"]
    assert _run(["export", front[0]["run_id"], "--format", "state_dict", "-o",
                 str(work.parent / "m.pt")], work, env).returncode == 0
    assert _run(["resume", run_dir], work, env).returncode == 0  # complete: nothing to do


def test_a_search_whose_every_trial_fails_exits_1(newcomer):
    work, env = newcomer
    spec = work.parent / "failing.yaml"
    # lr 1e30 diverges at once (TrainingDiverged): every trial fails, is recorded, and exit 1
    spec.write_text(QUICK.replace("optimizer: adamw, lr: 0.02", "optimizer: sgd, lr: 1.0e+30")
                    .replace("num_samples: 3", "num_samples: 2"))
    done = _run(["run", str(spec), "--no-mlflow"], work, env)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: every trial failed (2)" in done.stderr
