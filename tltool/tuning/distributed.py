"""The distributed roles of a search, from Keras Tuner's environment variables, and the chief's oracle service.

With KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT set, the process whose KERASTUNER_TUNER_ID contains
"chief" runs the oracle (and writes the reports); every other process is a worker that asks it for trials
and runs them. The service is Keras Tuner's own gRPC servicer, reached through `keras_tuner.src` (no public
API exposes it; tests/test_dependency_apis.py fails if a Keras Tuner release moves it), with three guards
Keras Tuner lacks:

- a lost worker: the chief gives up on a worker it has not heard from for TLTOOL_WORKER_TIMEOUT_S seconds
  (workers send a heartbeat every few seconds, during trials too). Its trial goes back in the queue for
  another worker, once; lost a second time, it is recorded as failed. Keras Tuner alone keeps the dead
  worker's id and waits for it forever;
- one process per tuner id: a second process started with a KERASTUNER_TUNER_ID in use is refused (two
  would be handed the same trial). A worker restarted after a crash is let in once its old process has
  stopped answering;
- a shared token: with TLTOOL_TUNE_TOKEN set on the chief, every call must carry the same value (the
  gRPC port is unauthenticated and unencrypted; the token keeps strangers from steering the search, not
  eavesdroppers from reading it: use a private network).
"""

from __future__ import annotations

import os
import time

from tltool.errors import TuneError

WORKER_TIMEOUT_ENV = "TLTOOL_WORKER_TIMEOUT_S"
TOKEN_ENV = "TLTOOL_TUNE_TOKEN"
DEFAULT_WORKER_TIMEOUT_S = 300.0
HEARTBEAT_S = 5.0  # how often a worker says it is alive; a tuner id is "in use" while heard within 3 of these


def oracle_address() -> str:
    return f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"


def worker_timeout() -> float:
    """TLTOOL_WORKER_TIMEOUT_S, checked: seconds without word after which the chief gives up on a worker."""
    text = os.environ.get(WORKER_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_WORKER_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 3 * HEARTBEAT_S:
        raise TuneError(f"Expected {WORKER_TIMEOUT_ENV} to be a number of seconds of at least {3 * HEARTBEAT_S:g} "
                        f"(workers send a heartbeat every {HEARTBEAT_S:g} s). Received: {WORKER_TIMEOUT_ENV}={text}")
    return value


def serve_oracle(oracle, log=print, poll: float = 0.5) -> None:
    """Run the chief's oracle as a guarded gRPC service until every worker has been told to stop or given up on.

    Keras Tuner's own `start_server` checks for the end every 20 s; this checks every `poll` seconds.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    from tltool.tuning.guarded_oracle import GuardedOracleServicer

    address = oracle_address()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = GuardedOracleServicer(oracle, worker_timeout(), os.environ.get(TOKEN_ENV) or None, log)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise TuneError(f"The chief cannot listen on {address}: is the address this machine's and the port free? "
                        f"Set KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT accordingly.")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll)
            servicer.give_up_on_silent_workers()
    finally:
        server.stop(grace=2).wait()


def distributed_role() -> str:
    """"single", "chief" or "worker", from Keras Tuner's environment variables (checked, with what to fix)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [name for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(name)]
    if missing:
        raise TuneError(f"KERASTUNER_ORACLE_IP is set, so this is a distributed search, but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not. Set KERASTUNER_ORACLE_PORT and "
                        f"KERASTUNER_TUNER_ID (chief, worker0, worker1, ...), or unset KERASTUNER_ORACLE_IP.")
    if not os.environ["KERASTUNER_ORACLE_PORT"].isdigit():
        raise TuneError(f"Expected KERASTUNER_ORACLE_PORT to be a port number. "
                        f"Received: KERASTUNER_ORACLE_PORT={os.environ['KERASTUNER_ORACLE_PORT']}")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


#: A worker told to wait (an IDLE trial) asks again after this many seconds; Keras Tuner asks at once.
IDLE_PAUSE_S = 1.0


def guard_worker(client, tuner_id: str) -> None:
    """Make a worker's Keras Tuner OracleClient a guarded one (see tltool.tuning.guarded_oracle) that pauses
    before asking again when told to wait."""
    from tltool.tuning.guarded_oracle import guard_client

    guard_client(client, tuner_id)
    create_trial = client.create_trial

    def create_trial_pausing_when_idle(asking_id):
        trial = create_trial(asking_id)
        if trial.status == "IDLE":
            time.sleep(IDLE_PAUSE_S)
        return trial

    client.create_trial = create_trial_pausing_when_idle
