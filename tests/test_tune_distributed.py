"""Distributed `tltool tune`: a chief and two workers on 127.0.0.1, through Keras Tuner's own gRPC oracle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 300  # the whole search; each process is killed once it is over


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"process exited early with code {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


@pytest.mark.slow
def test_chief_and_two_workers_share_one_search(tmp_path, image_folder):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"tune": {"space": {"head.dropout": {"choice": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}},
                                               "algorithm": "random"}}))
    out = tmp_path / "search"
    port = _free_port()
    command = [sys.executable, "-m", "tltool", "tune", str(recipe), "--data", str(image_folder), "--weights", "none",
               "--image-size", "32", "--batch-size", "8", "--set", "frozen.epochs=10", "--set", "fine_tune.epochs=0",
               # No augmented views or flip to measure in each worker: what is tested is the sharing.
               "--set", "frozen.feature_views=0", "--set", "augment.flip=horizontal",
               "--max-trials", "6", "--out", str(out)]
    base_env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port),
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    logs, processes = {}, {}
    try:
        for tuner_id in ("chief", "worker0", "worker1"):
            logs[tuner_id] = tmp_path / f"{tuner_id}.log"
            processes[tuner_id] = subprocess.Popen(
                command, env={**base_env, "KERASTUNER_TUNER_ID": tuner_id}, cwd=ROOT,
                stdout=logs[tuner_id].open("w"), stderr=subprocess.STDOUT)
            if tuner_id == "chief":  # workers start once the chief listens, so neither waits on gRPC back-off
                _wait_for(lambda: "Chief: serving" in logs["chief"].read_text(), processes["chief"], 120)
        deadline = time.monotonic() + LIMIT_S
        for tuner_id, process in processes.items():
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, f"{tuner_id} exited with {code}:\n{logs[tuner_id].read_text()[-3000:]}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_completed"] == 6
    workers = [trial["worker"] for trial in summary["trials"]]
    assert set(workers) == {"worker0", "worker1"}, workers  # both ran trials, the chief none
    for tuner_id in ("worker0", "worker1"):
        ran = workers.count(tuner_id)
        assert f"Worker {tuner_id}: ran {ran} trial(s)" in logs[tuner_id].read_text()
    assert (out / "best.yaml").is_file() and "Best: trial" in logs["chief"].read_text()


@pytest.mark.slow
def test_a_lost_worker_a_duplicate_id_and_a_wrong_token_do_not_stall_the_search(tmp_path, image_folder):
    """Keras Tuner alone: the chief waits forever for a worker killed mid-trial, and two processes with one
    tuner id are handed the same trial. Here the lost worker's trial goes to the other worker after
    TLTOOL_WORKER_TIMEOUT_S, the duplicate and a worker without the token are refused, and the chief exits."""
    recipe = tmp_path / "recipe.yaml"
    # Random over twelve values for five trials: a new trial is always at hand (a grid makes workers wait for
    # results, and a random search over as many values as trials may stop early on repeats).
    values = [round(0.05 * i, 2) for i in range(12)]
    recipe.write_text(yaml.safe_dump({"tune": {"space": {"head.dropout": {"choice": values}}, "algorithm": "random"}}))
    out = tmp_path / "search"
    port = _free_port()
    # Trials of a few seconds (no early stopping), so that a worker killed just after one trial is inside the next.
    command = [sys.executable, "-m", "tltool", "tune", str(recipe), "--data", str(image_folder), "--weights", "none",
               "--image-size", "32", "--batch-size", "8", "--set", "frozen.epochs=200",
               "--set", "frozen.early_stopping=0", "--set", "fine_tune.epochs=0",
               "--set", "frozen.feature_views=0", "--set", "augment.flip=horizontal", "--max-trials", "5",
               "--out", str(out)]
    base_env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port),
                "TLTOOL_TUNE_TOKEN": "s3cret", "TLTOOL_WORKER_TIMEOUT_S": "15",
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    logs, processes = {}, {}

    def start(name: str, tuner_id: str, **env) -> None:
        logs[name] = tmp_path / f"{name}.log"
        processes[name] = subprocess.Popen(command, env={**base_env, "KERASTUNER_TUNER_ID": tuner_id, **env}, cwd=ROOT,
                                           stdout=logs[name].open("w"), stderr=subprocess.STDOUT)

    def chief_log() -> str:
        return logs["chief"].read_text()

    try:
        start("chief", "chief")
        _wait_for(lambda: "Chief: serving" in chief_log(), processes["chief"], 120)
        start("stranger", "worker9", TLTOOL_TUNE_TOKEN="guess")
        # Two processes with one id, started together: whichever asks the chief second is refused.
        start("worker0", "worker0")
        start("worker0-again", "worker0")
        start("worker1", "worker1")
        _wait_for(lambda: "[worker1]" in chief_log(), processes["chief"], 180)
        time.sleep(1.0)  # worker1 has started its next trial
        processes["worker1"].kill()
        deadline = time.monotonic() + LIMIT_S
        codes = {name: processes[name].wait(timeout=max(1.0, deadline - time.monotonic()))
                 for name in ("chief", "worker0", "worker0-again", "stranger")}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    assert codes["chief"] == 0, chief_log()[-3000:]
    assert "Chief: no word from worker1 for 15 s" in chief_log()
    assert "goes back in the queue for another worker" in chief_log(), chief_log()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_completed"] == 5, summary["trials"]  # the lost trial was run again, by worker0
    assert codes["stranger"] != 0 and "TLTOOL_TUNE_TOKEN is missing or differs" in logs["stranger"].read_text()
    ran, refused = sorted(("worker0", "worker0-again"), key=lambda name: codes[name] != 0)
    assert codes[ran] == 0 and codes[refused] != 0, (codes, logs[refused].read_text()[-3000:])
    assert "KERASTUNER_TUNER_ID=worker0 is in use" in logs[refused].read_text()
    by_worker0 = [trial["worker"] for trial in summary["trials"]].count("worker0")
    assert f"Worker worker0: ran {by_worker0} trial(s)" in logs[ran].read_text()
    for name in ("stranger", refused):
        assert "Traceback" not in logs[name].read_text()


def test_a_worker_with_nothing_left_to_run_waits_while_another_trial_may_come_back(tmp_path):
    """Keras Tuner tells a worker to stop once every trial is handed out; if another worker is then lost,
    its trial goes back in the queue with nobody left to run it. The chief's oracle tells idle workers to
    wait while other trials are out, and hands them the requeued one."""
    from tltool.tuning.guarded_oracle import _drop_worker, _end_lost_trial
    from tltool.tuning.search import make_oracle
    from tltool.tuning.space import SearchSpace

    oracle = make_oracle("random", "val_accuracy", 2, 0, 1)
    oracle._set_project_dir(str(tmp_path), "search")
    hp = oracle.get_space()
    SearchSpace({"head.dropout": {"choice": [0.0, 0.1, 0.2, 0.3]}}).declare(hp)
    oracle.update_space(hp)
    first, second = oracle.create_trial("worker0"), oracle.create_trial("worker1")
    oracle.update_trial(first.trial_id, {"val_accuracy": 0.5})
    first.status = "COMPLETED"
    oracle.end_trial(first)
    assert oracle.create_trial("worker0").status == "IDLE"  # worker1's trial is still out
    _end_lost_trial(oracle, _drop_worker(oracle, "worker1"), requeue=True, message="lost")
    again = oracle.create_trial("worker0")
    assert again.status == "RUNNING" and again.trial_id == second.trial_id
    oracle.update_trial(again.trial_id, {"val_accuracy": 0.6})
    again.status = "COMPLETED"
    oracle.end_trial(again)
    assert oracle.create_trial("worker0").status == "STOPPED"  # nothing out any more: the search is over


def test_a_refused_duplicate_ends_when_the_chief_is_gone_instead_of_waiting_for_ever(monkeypatch):
    """A second process with a tuner id in use is retried (a restarted worker gets in once its old process is
    given up on); when the search ends meanwhile, the chief is gone: Keras Tuner's calls wait for a chief to
    come up (wait_for_ready), so the retry must not, and the refusal stands."""
    import grpc

    from tltool.errors import TuneError
    from tltool.tuning import guarded_oracle

    monkeypatch.setattr(guarded_oracle.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")

    class Refusal:
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    class Call:
        def __init__(self, error):
            self.error = error

        def exception(self):
            return self.error

    answers = [Refusal(grpc.StatusCode.ALREADY_EXISTS, "KERASTUNER_TUNER_ID=worker0 is in use by another worker"),
               Refusal(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")]
    waits = []

    def continuation(details, request):
        waits.append(details.wait_for_ready)
        return Call(answers.pop(0))

    interceptor = guarded_oracle._CallerInterceptor([("tltool-tuner-id", "worker0")])
    original = guarded_oracle._CallDetails("/CreateTrial", None, [], None, True, None)
    with pytest.raises(TuneError, match="refused this worker: KERASTUNER_TUNER_ID=worker0 is in use"):
        interceptor.intercept_unary_unary(continuation, original, object())
    assert waits == [True, False]  # the first call as Keras Tuner makes it, the retry without waiting
