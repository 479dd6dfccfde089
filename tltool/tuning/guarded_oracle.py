"""The guards of a distributed search (see tltool.tuning.distributed): the chief's side, a gRPC servicer
that checks every call, and the worker's side, a client interceptor and a heartbeat."""

from __future__ import annotations

import collections
import hmac
import os
import threading
import time
import uuid

import grpc
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief
from keras_tuner.src.engine.oracle import synchronized

from tltool.errors import TuneError
from tltool.tuning.distributed import HEARTBEAT_S, TOKEN_ENV, WORKER_TIMEOUT_ENV, oracle_address
from tltool.tuning.reports import trial_number

IN_USE_S = 3 * HEARTBEAT_S  # a tuner id heard from this recently belongs to a running process
# gRPC metadata keys (lower case, as gRPC requires) carried by every call of a tltool worker.
_TUNER, _SESSION, _TOKEN = "tltool-tuner-id", "tltool-session", "tltool-token"


class GuardedOracleServicer(oracle_chief.OracleServicer):
    """Keras Tuner's OracleServicer, checking the token and the caller's tuner id on every call, and
    remembering when each worker was last heard from."""

    def __init__(self, oracle, timeout_s: float, token: str | None, log):
        super().__init__(oracle)
        self.timeout_s, self.token, self.log = timeout_s, token, log
        self.heard: dict[str, float] = {}   # tuner id -> last call (time.monotonic)
        self.owner: dict[str, str] = {}     # tuner id -> session (one random id per worker process)
        self.given_up: set[str] = set()     # sessions of workers the chief gave up on
        self.losses: collections.Counter = collections.Counter()  # trial id -> times its worker was lost
        self.stopped: set[str] = set()      # tuner ids told the search is over: no longer waited for

    def _admit(self, context) -> tuple[str | None, str | None]:
        """Check the caller; returns its (tuner id, session), or aborts the call with the reason."""
        meta = dict(context.invocation_metadata())
        if self.token is not None and not hmac.compare_digest(meta.get(_TOKEN, "").encode(), self.token.encode()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"this worker's {TOKEN_ENV} is missing or differs from the chief's")
        tuner_id, session = meta.get(_TUNER), meta.get(_SESSION)
        if session in self.given_up:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the chief gave this worker up after {self.timeout_s:g} s without word and handed its "
                          f"trial on; restart it to take part again")
        if tuner_id is not None and session is not None:
            owner = self.owner.get(tuner_id)
            if owner not in (None, session) and self._in_use(tuner_id):
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"KERASTUNER_TUNER_ID={tuner_id} is in use by another running worker; give each "
                              f"worker its own id (worker0, worker1, ...)")
            self.owner[tuner_id] = session
            if tuner_id not in self.stopped:
                self.heard[tuner_id] = time.monotonic()
        return tuner_id, session

    def _in_use(self, tuner_id: str) -> bool:
        return time.monotonic() - self.heard.get(tuner_id, float("-inf")) < IN_USE_S

    def GetSpace(self, request, context):
        self._admit(context)
        return super().GetSpace(request, context)

    def UpdateSpace(self, request, context):
        self._admit(context)
        return super().UpdateSpace(request, context)

    def CreateTrial(self, request, context):
        tuner_id, _ = self._admit(context)
        response = super().CreateTrial(request, context)
        if self.stop_triggered and tuner_id is not None and request.tuner_id not in self.oracle.tuner_ids:
            self.stopped.add(tuner_id)  # told to stop: its last heartbeats must not make it look lost
            self.heard.pop(tuner_id, None)
        return response

    def UpdateTrial(self, request, context):
        self._admit(context)
        return super().UpdateTrial(request, context)

    def EndTrial(self, request, context):
        self._admit(context)
        return super().EndTrial(request, context)

    def GetTrial(self, request, context):
        self._admit(context)
        return super().GetTrial(request, context)

    def GetBestTrials(self, request, context):
        self._admit(context)
        return super().GetBestTrials(request, context)

    def give_up_on_silent_workers(self) -> None:
        """Workers not heard from for `timeout_s`: forget their id; requeue their trial (once) or fail it."""
        now = time.monotonic()
        for tuner_id in [t for t, heard in list(self.heard.items()) if now - heard > self.timeout_s]:
            trial = _drop_worker(self.oracle, tuner_id)
            self.given_up.add(self.owner.pop(tuner_id, ""))
            del self.heard[tuner_id]
            if trial is None:
                self.log(f"Chief: no word from {tuner_id} for {self.timeout_s:g} s ({WORKER_TIMEOUT_ENV}); "
                         f"it held no trial and is no longer waited for.")
                continue
            self.losses[trial.trial_id] += 1
            requeue = self.losses[trial.trial_id] == 1
            _end_lost_trial(self.oracle, trial, requeue,
                            f"worker {tuner_id} lost (no word for {self.timeout_s:g} s)")
            what_now = ("the trial goes back in the queue for another worker." if requeue
                        else "the trial is recorded as failed (its worker was lost twice).")
            self.log(f"Chief: no word from {tuner_id} for {self.timeout_s:g} s ({WORKER_TIMEOUT_ENV}) while it ran "
                     f"trial {trial_number(trial.trial_id)}: {what_now}")


# Keras Tuner's oracle lock around these two: the gRPC thread changes the oracle too.
@synchronized
def _drop_worker(oracle, tuner_id: str):
    """Stop waiting for `tuner_id`; returns the trial it was running, if any (still marked running)."""
    oracle.tuner_ids.discard(tuner_id)
    return oracle.ongoing_trials.pop(tuner_id, None)


@synchronized
def _end_lost_trial(oracle, trial, requeue: bool, message: str) -> None:
    if requeue:  # what Keras Tuner does with a trial it retries: the next create_trial takes it first
        getattr(oracle, "trial_log", {}).pop(trial.trial_id, None)  # its next worker starts a new entry
        oracle._retry_queue.append(trial.trial_id)
        oracle.save()
        return
    trial.status, trial.message = "FAILED", message
    oracle.end_trial(trial)


def guard_client(client, tuner_id: str) -> None:
    """A worker's OracleClient: its calls carry the tuner id, a session id and the token, refusals become one
    line, and a heartbeat thread keeps the chief from giving up on it during long trials."""
    metadata = [(_TUNER, tuner_id), (_SESSION, uuid.uuid4().hex)]
    if os.environ.get(TOKEN_ENV):
        metadata.append((_TOKEN, os.environ[TOKEN_ENV]))
    channel = grpc.intercept_channel(grpc.insecure_channel(oracle_address()), _CallerInterceptor(metadata))
    client.stub = protos.get_service_grpc().OracleStub(channel)
    threading.Thread(target=_heartbeat, args=(client.stub,), name="tltool-heartbeat", daemon=True).start()


def _heartbeat(stub) -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            stub.GetSpace(protos.get_service().GetSpaceRequest(), timeout=HEARTBEAT_S)
        except Exception:  # noqa: BLE001 - a missed beat is not an error; the worker's own calls report
            pass


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                            "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _CallerInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Adds the worker's metadata to each call. A tuner id in use is retried until its old process would have
    been given up on (a worker restarted after a crash gets in); other refusals end the worker with one line."""

    def __init__(self, metadata):
        self.metadata = metadata

    def intercept_unary_unary(self, continuation, call_details, request):
        details = _CallDetails(call_details.method, call_details.timeout,
                               list(call_details.metadata or []) + self.metadata, call_details.credentials,
                               call_details.wait_for_ready, call_details.compression)
        deadline = time.monotonic() + IN_USE_S + 2 * HEARTBEAT_S
        refused = None
        while True:
            call = continuation(details, request)
            error = call.exception()
            if error is None:
                return call
            code = error.code()
            if code == grpc.StatusCode.ALREADY_EXISTS and time.monotonic() < deadline:
                time.sleep(1.0)
                # Asked again without waiting for a chief to be there (Keras Tuner's calls wait for one): a
                # search that ends meanwhile must end this worker too, not leave it waiting for ever.
                refused, details = error, details._replace(wait_for_ready=False)
                continue
            if code == grpc.StatusCode.UNAVAILABLE and refused is not None:
                error, code = refused, grpc.StatusCode.ALREADY_EXISTS  # the chief is gone: its refusal stands
            if code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.FAILED_PRECONDITION):
                raise TuneError(f"The chief at {oracle_address()} refused this worker: {error.details()}.")
            return call
