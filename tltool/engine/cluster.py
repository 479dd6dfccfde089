"""Multi-worker training (`train.strategy: multi_worker`): the workers of a run and what they share.

A run on N hosts is N processes started with the same command, told apart by TensorFlow's standard
`TF_CONFIG` (the cluster's addresses and this process's task). The chief (the task `chief`, or `worker` 0
when the cluster has none) *is* the run: it checks the data, owns the run directory and decides. The other
workers keep no state of their own, so a lost worker is restarted with the command it was started with:

- at the start the chief sends its recipe (with the decisions it has measured) and which stages are done;
  each worker checks that its data are the chief's (same files, same split) or every worker stops;
- each worker trains on its shard of the images (every N-th file) at the recipe's batch size, so the global
  batch is `batch_size` x replicas; the gradients are summed by `MultiWorkerMirroredStrategy`'s all-reduce;
- stage 1's features and stage 2's cached activations are extracted by each worker for its own shard
  (extraction is stage 1's whole cost, and nothing large crosses the network); what needs every image (the
  measured decisions, calibration, the OOD bank) gathers the small pooled features;
- every decision (early stopping, a measured augmentation, keeping stage 1) is the chief's, and the weights
  are the chief's at every stage boundary and after every resume, so the replicas never drift apart;
- a collective that fails (a worker killed, a host gone) raises WorkerLostError, and the `tltool` program
  restarts itself (the chief resuming from its last finished epoch) and waits for the cluster to form again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltool.errors import RecipeError, WorkerLostError

#: seconds a collective waits for the other workers before the run counts one as lost (see README).
TIMEOUT_ENV = "TLTOOL_WORKER_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Role:
    """This process's place in the cluster TF_CONFIG describes."""

    task_type: str
    task_index: int
    num_workers: int
    has_chief_job: bool = False  # a `chief` task apart from the workers (else worker 0 is the chief)

    @property
    def is_chief(self) -> bool:
        if self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_index == 0 and not self.has_chief_job

    @property
    def index(self) -> int:
        """This worker's place among all workers, the chief first (the order of the all-reduce)."""
        return self.task_index + (1 if self.has_chief_job and self.task_type == "worker" else 0)

    @property
    def name(self) -> str:
        return f"{self.task_type} {self.task_index}"


def role_from_environment() -> Role:
    """The role TF_CONFIG gives this process, or a one-line RecipeError saying what is missing."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise RecipeError("train.strategy multi_worker needs TF_CONFIG: the cluster's addresses and this "
                          "process's task, e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", "
                          "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' (see README).")
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        task_type, index = str(task["type"]), int(task["index"])
        jobs = {job: list(addresses) for job, addresses in cluster.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RecipeError(f"TF_CONFIG is not valid ({exc}): it needs \"cluster\" (job -> addresses) and "
                          f"\"task\" (type and index); see README.") from None
    if task_type not in ("chief", "worker") or index >= len(jobs.get(task_type, [])) or index < 0:
        raise RecipeError(f"TF_CONFIG's task ({task_type} {index}) is not in its cluster "
                          f"({', '.join(f'{j}: {len(a)}' for j, a in jobs.items())}).")
    workers = len(jobs.get("chief", [])) + len(jobs.get("worker", []))
    return Role(task_type, index, workers, "chief" in jobs)


def split_fingerprint(split) -> str:
    """What the workers must agree on: the classes and every image of every set, with its label, by path
    within its folder (hosts may mount the data elsewhere; the split and the order must be the same)."""
    digest = hashlib.sha256(json.dumps(split.train.classes).encode())
    for folder in (split.train, split.val, split.test):
        if folder is None:
            digest.update(b"-")
            continue
        for path, label in zip(folder.paths, folder.labels):
            digest.update(f"{Path(path).relative_to(folder.root).as_posix()}\t{label}\n".encode())
    return digest.hexdigest()


def _collective_errors():
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError, tf.errors.InternalError)


def _is_collective_failure(exc) -> bool:
    """Whether a TensorFlow error is the cluster's (a lost peer) rather than a bug: an unreachable or silent
    peer always is; an internal, aborted or cancelled op only when a collective says so."""
    import tensorflow as tf

    if isinstance(exc, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)):
        return True
    text = str(exc)
    return "ollective" in text or "unhealthy" in text or "heartbeat" in text


class Cluster:
    """The workers of a multi-worker run: its strategy, this worker's role, and the collectives they share.

    Every method that communicates is a collective: every worker calls it, in the same order.
    """

    def __init__(self, role: Role, say=print):
        import tensorflow as tf

        self.role = role
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        say(f"Multi-worker run: this is the {role.name} of {role.num_workers} workers (TF_CONFIG); waiting for "
            f"all of them to join.")
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        self.replicas = int(self.strategy.num_replicas_in_sync)
        #: whether the chief has sent the workers their plan (before it, a failure of the chief is sent instead)
        self.planned = False

    @property
    def is_chief(self) -> bool:
        return self.role.is_chief

    @property
    def num_workers(self) -> int:
        return self.role.num_workers

    @property
    def index(self) -> int:
        return self.role.index

    def shard(self, folder):
        """This worker's share of an ImageFolder: every N-th image, from its index."""
        return folder.subset(range(self.index, len(folder), self.num_workers))

    def shard_split(self, split):
        """This worker's share of a SplitData's training and validation images (the chief tests alone)."""
        return dataclasses.replace(split, train=self.shard(split.train), val=self.shard(split.val))

    # ---------------------------------------------------------------------------------- collectives

    @contextlib.contextmanager
    def watching(self):
        """Run the block with a failed collective (a worker killed, a host gone, a peer past the timeout) turned
        into WorkerLostError. Anything that touches the strategy's variables may be one: a step, a sync, saving
        or loading weights."""
        try:
            yield
        except _collective_errors() as exc:
            if not _is_collective_failure(exc):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise WorkerLostError(f"A worker of this multi-worker run stopped answering ({type(exc).__name__}: "
                                  f"{first[:160]}).") from None

    def _sum(self, value: np.ndarray) -> np.ndarray:
        """The sum over workers of `value` (each worker's first replica contributes it, the others zeros)."""
        import tensorflow as tf

        tensor = tf.constant(value)
        calls = []

        def per_replica(_context):
            calls.append(None)
            return tensor if len(calls) == 1 else tf.zeros_like(tensor)

        values = self.strategy.experimental_distribute_values_from_function(per_replica)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()

    def counts(self, count: int) -> list[int]:
        """Every worker's `count`, in worker order."""
        mine = np.zeros(self.num_workers, np.int64)
        mine[self.index] = count
        return [int(c) for c in self._sum(mine)]

    def broadcast_number(self, value: float) -> float:
        """The chief's `value`, on every worker."""
        return float(self._sum(np.asarray(value if self.is_chief else 0.0, np.float64)))

    def broadcast_bytes(self, data: bytes | None = None) -> bytes:
        """The chief's `data`, on every worker (the others pass None)."""
        size = int(self.broadcast_number(len(data) if self.is_chief else 0))
        words = np.zeros(-(-size // 4), np.int32)  # 4 bytes to a word: the collectives carry numbers
        if self.is_chief:
            words.view(np.uint8)[:size] = np.frombuffer(data, np.uint8)
        return self._sum(words).view(np.uint8)[:size].tobytes()

    def broadcast_json(self, value=None):
        """The chief's JSON-able `value`, on every worker (the others pass None)."""
        return json.loads(self.broadcast_bytes(json.dumps(value).encode() if self.is_chief else None))

    def share_folder(self, chief_folder: Path | None, folder: Path) -> None:
        """The files under the chief's `chief_folder`, copied into `folder` on every other worker (which
        keeps none of its own): how a restarted worker gets the chief's checkpoints."""
        import io
        import tarfile

        packed = None
        if self.is_chief:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                if chief_folder is not None and Path(chief_folder).is_dir():
                    tar.add(str(chief_folder), arcname=".")
            packed = buffer.getvalue()
        received = self.broadcast_bytes(packed)
        if not self.is_chief:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(received), mode="r") as tar:
                tar.extractall(folder, filter="data")

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every worker's `rows` (same trailing shape), concatenated in worker order, on every worker."""
        counts = self.counts(len(rows))
        start = sum(counts[:self.index])
        dtype = rows.dtype
        full = np.zeros((sum(counts), *rows.shape[1:]), np.float32 if dtype.kind == "f" else np.int64)
        full[start:start + len(rows)] = rows
        return self._sum(full).astype(dtype)

    def sync_variables(self, variables) -> None:
        """Set `variables` (Keras variables) to the chief's values on every worker: one collective per dtype."""
        import keras

        variables = list(variables)
        groups: dict = {}
        for variable in variables:
            groups.setdefault(np.dtype(variable.dtype).kind == "f", []).append(variable)
        for floating, group in groups.items():
            values = [np.asarray(v.numpy()) for v in group]
            flat = np.concatenate([v.ravel() for v in values]).astype(np.float32 if floating else np.int64)
            if not self.is_chief:
                flat[:] = 0
            summed, at = self._sum(flat), 0
            for variable, value in zip(group, values):
                variable.assign(summed[at:at + value.size].reshape(value.shape).astype(value.dtype))
                at += value.size

    def agree(self, ok: bool) -> list[int]:
        """The workers (by index) for which `ok` is false."""
        flags = np.zeros(self.num_workers, np.int64)
        flags[self.index] = 0 if ok else 1
        return [i for i, bad in enumerate(self._sum(flags)) if bad]

