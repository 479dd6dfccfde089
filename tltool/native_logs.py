"""TensorFlow's, LiteRT's and MediaPipe's C++ log lines: kept off the terminal unless the user asks for them.

Their native code writes straight to file descriptor 2 (absl and glog-style lines such as "I0000 ...
port.cc:153] oneDNN custom operations are on", "failed call to cuInit: ... CUDA error" on a machine
without a GPU), before and regardless of TF_CPP_MIN_LOG_LEVEL. Python cannot filter what never passes
through `sys.stderr`, so:

- the `tltool` command routes descriptor 2 through a small forked process that drops known noise line by
  line and passes everything else on at once. Being a separate process, it still passes on the last lines
  of a command that crashes in native code (a fatal "F0000 ... Check failed" is never noise);
- the Python API, which must not take over its caller's stderr, filters only the few places that provoke
  such lines (importing TensorFlow and probing its devices, loading a TFLite model in MediaPipe): they run
  with descriptor 2 pointed at a temporary file, and every line that is not noise is written out afterwards.

`--verbose` or TLTOOL_VERBOSE=1 turns both off and shows TensorFlow's own log level.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import select
import signal
import sys
import tempfile
import time

VERBOSE_ENV = "TLTOOL_VERBOSE"
_QUIET_TF_LEVEL = "2"  # TensorFlow's own filter: errors only (it applies once its logger is set up)

# Informational and warning lines from absl/glog-style loggers, and the "errors" that only mean "no GPU here".
_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "
    r"|E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*(cuInit|CUDA|cuda|cuDNN|cuFFT|cuBLAS|TensorRT|oneDNN supports)"
    # A multi-worker run's collectives and coordination service on a peer that finished or was lost: tltool
    # says which in its own line (the heartbeat error's message goes on over two more lines).
    r"|E\d{4} [\d:.]+ +\d+ (coordination_service\w*|base_collective_executor|ring_alg|collective_\w+)\.cc:\d+\] "
    r"|/job:\w+/replica:\d+/task:\d+$"
    r"|The tasks have crashed\. Check the task logs for an earlier error"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    r"|INFO: Initialized TensorFlow Lite runtime\."
    r"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, output_inference_type: \w+$"  # int8
)

_state = {"tf_level_set_by_us": False, "tensorflow_ready": False, "filter_pid": 0}


def verbose() -> bool:
    """Whether the user asked to see the native libraries' own log lines (TLTOOL_VERBOSE=1 or --verbose)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_tensorflow_log_level() -> None:
    """Set TF_CPP_MIN_LOG_LEVEL before TensorFlow loads, unless the user set it or asked for verbose logs."""
    if not verbose() and "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _QUIET_TF_LEVEL
        _state["tf_level_set_by_us"] = True


def set_verbose() -> None:
    """Show native log lines from now on, at TensorFlow's default level unless the user set one."""
    os.environ[VERBOSE_ENV] = "1"
    if _state["tf_level_set_by_us"]:
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        _state["tf_level_set_by_us"] = False


def is_noise(line: str) -> bool:
    return _NOISE.match(line) is not None


@contextlib.contextmanager
def filtered_native_stderr():
    """Run the block with descriptor 2 captured; afterwards, replay every line that is not start-up noise."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 to redirect (a detached process): nothing would show anyway
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines() if not is_noise(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe its devices once: the two steps that print native start-up lines."""
    if _state["tensorflow_ready"]:
        return
    with filtered_native_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # CUDA's probe ("failed call to cuInit") happens here
    _state["tensorflow_ready"] = True


def filter_process_stderr() -> None:
    """The `tltool` command's stderr through a forked filter process (POSIX; call before TensorFlow loads).

    The fork happens before any thread exists; the filter ignores Ctrl-C and SIGTERM (they are for the
    command) and ends when the last writer of the pipe is gone, having passed on everything it read.
    """
    if verbose() or not hasattr(os, "fork") or _state["filter_pid"]:
        return
    try:
        real_stderr = os.dup(2)
    except OSError:
        return
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(write_end)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # hold no copy of the command's terminal or pipes but the one it forwards to
                os.dup2(devnull, fd)
            _forward_filtered(read_end, real_stderr)
        except Exception:  # noqa: BLE001 - never leave the command writing into a pipe nobody reads
            _forward_raw(read_end, real_stderr)
        finally:
            os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.close(real_stderr)
    _state["filter_pid"] = pid
    atexit.register(_wait_for_filter)


def _forward_filtered(source: int, target: int) -> None:
    """Copy `source` to `target` line by line, dropping noise; a partial line goes on after 0.1 s of quiet."""
    pending = b""
    while True:
        ready, _, _ = select.select([source], [], [], 0.1 if pending else None)
        if not ready:  # a prompt or a progress bar without a newline yet
            _write_all(target, pending)
            pending = b""
            continue
        chunk = os.read(source, 65536)
        if not chunk:
            _write_all(target, pending)
            return
        *lines, pending = (pending + chunk).split(b"\n")
        kept = [line for line in lines if not is_noise(line.decode("utf-8", "replace"))]  # bytes pass as they came
        if kept:
            _write_all(target, b"\n".join(kept) + b"\n")


def _forward_raw(source: int, target: int) -> None:
    while chunk := os.read(source, 65536):
        _write_all(target, chunk)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:  # the terminal or reader went away: nothing left to show the lines to
            return


def _wait_for_filter() -> None:
    """At exit, let the filter pass on the last lines before the shell prompt returns."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # our end of the pipe closed: the filter reads the end and stops
    os.close(devnull)
    deadline = time.monotonic() + 2.0  # bounded: a process the command started may still hold the pipe
    while time.monotonic() < deadline:
        try:
            if os.waitpid(_state["filter_pid"], os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)
