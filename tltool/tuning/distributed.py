"""The distributed roles of a search, from Keras Tuner's environment variables, and the chief's oracle service.

With KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT set, the process whose KERASTUNER_TUNER_ID contains
"chief" runs the oracle (and writes the reports); every other process is a worker that asks it for trials
and runs them. The service is Keras Tuner's own gRPC servicer, reached through `keras_tuner.src` (no public
API exposes it; tests/test_dependency_apis.py fails if a Keras Tuner release moves it).
"""

from __future__ import annotations

import os
import time

from tltool.errors import TuneError


def oracle_address() -> str:
    return f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"


def serve_oracle(oracle, poll: float = 0.5) -> None:
    """Run the chief's oracle as Keras Tuner's gRPC service until every worker has been told to stop.

    Keras Tuner's own `start_server` checks for the end every 20 s; this checks every `poll` seconds.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = oracle_address()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
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
