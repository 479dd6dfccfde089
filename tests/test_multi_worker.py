"""`train.strategy: multi_worker`: one run trained by two worker processes on 127.0.0.1 (TF_CONFIG)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import calibrated_backbone_weights, make_image_folder
from tltool.engine.cluster import Role, role_from_environment, split_fingerprint
from tltool.engine.history import read_history
from tltool.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 240  # a whole two-worker run; its processes are killed once it is over


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """Twenty images per class and backbone weights whose features tell the classes apart: a random VGG16
    (no BatchNorm to shrink its features) keeps the colours; a random MobileNetV2 at 32 px does not."""
    root = tmp_path_factory.mktemp("multi-worker")
    images = make_image_folder(root / "images", per_class=20, seed=3)
    weights = calibrated_backbone_weights(root / "backbone.weights.h5", backbone="vgg16", images=images)
    return images, weights


def _command(images: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tltool", "finetune", "--data", str(images), "--backbone", "vgg16",
            "--weights", str(weights),
            "--image-size", "32", "--batch-size", "8", "--set", "frozen.epochs=20", "--set", "frozen.learning_rate=0.01",
            "--set", "frozen.early_stopping=0", "--set", "fine_tune.epochs=3",
            "--set", "fine_tune.unfreeze=1", "--set", "frozen.feature_views=0", "--set", "augment.flip=horizontal",
            "--out", str(out), *extra]


class _Cluster:
    """Two `tltool finetune` processes, the chief (worker 0) and worker 1, each logging to a file."""

    def __init__(self, tmp_path: Path, chief_command: list[str], worker_command: list[str]):
        self.tmp_path, self.ports = tmp_path, _free_ports(2)
        self.commands = [chief_command, worker_command]
        self.processes: dict = {}
        self.logs: dict = {}
        self.starts = {0: 0, 1: 0}

    def start(self, index: int) -> None:
        self.starts[index] += 1
        log = self.tmp_path / f"worker{index}-{self.starts[index]}.log"
        self.logs[index] = log
        self.scratch = self.tmp_path / "tmp"  # where workers keep their scratch files
        self.scratch.mkdir(exist_ok=True)
        env = {**os.environ, "TF_CONFIG": _tf_config(self.ports, index), "TMPDIR": str(self.scratch),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.processes[index] = subprocess.Popen(self.commands[index], env=env, cwd=ROOT, stdout=log.open("w"),
                                                 stderr=subprocess.STDOUT)

    def log(self, index: int) -> str:
        return self.logs[index].read_text()

    def wait(self) -> dict:
        deadline = time.monotonic() + LIMIT_S
        try:
            return {i: p.wait(timeout=max(1.0, deadline - time.monotonic())) for i, p in self.processes.items()}
        finally:
            self.stop()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def test_two_workers_train_one_run_that_only_the_chief_writes(tmp_path, learnable):
    images, weights = learnable
    chief_out, worker_out = tmp_path / "run", tmp_path / "worker-run"
    cluster = _Cluster(tmp_path, _command(images, weights, chief_out, "--strategy", "multi_worker"),
                       _command(images, weights, worker_out, "--strategy", "multi_worker"))
    cluster.start(0)
    cluster.start(1)
    codes = cluster.wait()
    assert codes == {0: 0, 1: 0}, cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
    chief, worker = cluster.log(0), cluster.log(1)
    assert "Traceback" not in chief + worker and "E0000" not in chief + worker  # native log lines filtered
    # Both took part, each on its half of the 48 training images, at a global batch of 2 x 8.
    assert "Training on 2 workers (2 replicas): batch_size 8 per replica, a global batch of 16" in chief
    assert "this worker trains on 24 of the 48 training images" in chief
    assert "this worker trains on 24 of the 48 training images" in worker
    assert "Worker 1 of 2 done; the chief writes the run directory." in worker
    assert not worker_out.exists()  # a worker writes nothing where it was told to put a run
    summary = json.loads((chief_out / "summary.json").read_text())
    assert summary["strategy"] == "multi_worker" and summary["workers"] == 2
    # Calibration and the OOD bank were fitted on every worker's images, not the chief's shard alone.
    assert summary["trust"]["ood"]["training_images"] == 48
    # The head's penalty was measured (on every worker's features: the gathering is a collective each joins).
    assert "# Measured: head.l2: " in (chief_out / "recipe.yaml").read_text()
    stages = [(r["stage"], r["epoch"]) for r in read_history(chief_out / "history.csv")]
    assert stages[:20] == [(1, e) for e in range(1, 21)] and (2, 1) in stages

    # The same run in one process: the same images learnt as well (these colours are learnt perfectly).
    alone = subprocess.run(_command(images, weights, tmp_path / "alone"), cwd=ROOT, capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "TF_CONFIG"})
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert single["workers"] == 1 and single["val_accuracy"] == 1.0
    assert summary["val_accuracy"] >= single["val_accuracy"] - 0.1, (summary["val_accuracy"], single["val_accuracy"])


@pytest.mark.slow
def test_a_worker_killed_mid_stage_2_and_started_again_loses_no_epoch(tmp_path, learnable):
    """kill -9 worker 1 after two epochs of stage 2: the chief restarts itself with --resume and waits; the
    worker, started again with its own command, gets the chief's checkpoint; no epoch is lost or repeated."""
    images, weights = learnable
    out = tmp_path / "run"
    # Stage 2 streams images (slow enough to kill a worker inside it) for 5 epochs, no early stopping.
    extra = ("--strategy", "multi_worker", "--set", "fine_tune.epochs=5", "--set", "fine_tune.early_stopping=0",
             "--set", "fine_tune.activation_budget_mb=0")
    cluster = _Cluster(tmp_path, _command(images, weights, out, *extra), _command(images, weights, tmp_path / "w", *extra))
    cluster.start(0)
    cluster.start(1)
    try:
        deadline = time.monotonic() + LIMIT_S
        while sum(r["stage"] == 2 for r in read_history(out / "history.csv")) < 2:
            assert cluster.processes[0].poll() is None and time.monotonic() < deadline, cluster.log(0)[-3000:]
            time.sleep(0.2)
        cluster.processes[1].kill()
        cluster.processes[1].wait()
        cluster.start(1)
    except BaseException:
        cluster.stop()
        raise
    codes = cluster.wait()
    chief = cluster.log(0)
    assert codes == {0: 0, 1: 0}, chief[-3000:] + cluster.log(1)[-3000:]
    assert "Traceback" not in chief and "E0000" not in chief
    assert "stopped answering" in chief and "Restarting (1 of at most 10) to wait for it: tltool finetune --resume --out" in chief
    assert "Resuming: stage(s) [1] done; continuing from stage 2." in chief
    rows = [(r["stage"], r["epoch"]) for r in read_history(out / "history.csv")]
    assert rows == [(1, e) for e in range(1, 21)] + [(2, e) for e in range(1, 6)], rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True and summary["workers"] == 2
    # The killed worker's scratch files (checkpoints) were taken over by its restart, which removed them.
    assert not [p.name for p in cluster.scratch.iterdir() if p.name.startswith("tltool-worker-")]


# ------------------------------------------------------------------------------------ without a cluster


def test_multi_worker_without_tf_config_says_what_it_needs(tmp_path, image_folder):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run([sys.executable, "-m", "tltool", "finetune", "--data", str(image_folder), "--weights",
                             "none", "--strategy", "multi_worker", "--out", str(tmp_path / "run")], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "train.strategy multi_worker needs TF_CONFIG" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, message", [
    ("{not json", "TF_CONFIG is not valid"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "TF_CONFIG is not valid"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}', "is not in its cluster"),
])
def test_a_bad_tf_config_is_one_line(monkeypatch, config, message):
    monkeypatch.setenv("TF_CONFIG", config)
    with pytest.raises(RecipeError, match=message):
        role_from_environment()


def test_the_chief_is_the_chief_task_or_else_worker_0(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _tf_config([1, 2], 0))
    assert role_from_environment() == Role("worker", 0, 2, False) and role_from_environment().is_chief
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(with_chief))
    role = role_from_environment()
    assert role.num_workers == 3 and not role.is_chief and role.index == 1  # after the chief
    monkeypatch.setenv("TF_CONFIG", json.dumps({**with_chief, "task": {"type": "chief", "index": 0}}))
    assert role_from_environment().is_chief


def test_workers_compare_their_images_by_path_within_the_folder(tmp_path):
    from tltool.engine.setup import load_split_data
    from tltool.recipe import load_recipe

    def fingerprint(root: Path) -> str:
        return split_fingerprint(load_split_data(load_recipe(values={"data": {"train": str(root)}})))

    here = make_image_folder(tmp_path / "host1" / "images", seed=1)
    there = make_image_folder(tmp_path / "host2" / "data", seed=1)
    assert fingerprint(here) == fingerprint(there)  # the same files mounted elsewhere
    (there / "red" / "red_000.jpg").unlink()
    assert fingerprint(here) != fingerprint(there)


def test_tune_refuses_multi_worker_training(tmp_path, image_folder):
    import tltool

    with pytest.raises(RecipeError, match="tune's chief/worker mode"):
        tltool.tune(data=image_folder, weights="none", overrides=["train.strategy=multi_worker"],
                    out=tmp_path / "search")
