"""What a user sees in the terminal: tltool's own lines only, examples kept as lines, one count of skipped files.

These run `tltool` as its own process (`python -m tltool`), as a user does: the native log filter is a
property of the program, not of `main` invoked in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import make_image_folder, tiny_recipe_args
from salted_data import write_broken_files

from tltool.cli import main

# What TensorFlow, absl, CUDA and MediaPipe print natively: glog-style lines ("I0000 00:00:17.1 123 port.cc:153]")
# and absl's notice.
NATIVE_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]|absl::InitializeLog|cuInit|cuda drivers", re.M)


def run_tltool(*args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TLTOOL_VERBOSE")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "tltool", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_native_start_up_lines_are_hidden_unless_verbose():
    quiet = run_tltool("backbones", "mobilenet_v2")
    assert quiet.returncode == 0, quiet.stderr
    assert "mobilenet_v2" in quiet.stdout
    assert not NATIVE_LINE.search(quiet.stderr), quiet.stderr
    assert not NATIVE_LINE.search(quiet.stdout), quiet.stdout
    # The lines exist on this machine: --verbose (and TLTOOL_VERBOSE=1) show them.
    loud = run_tltool("backbones", "mobilenet_v2", "--verbose")
    assert loud.returncode == 0 and NATIVE_LINE.search(loud.stderr), loud.stderr
    assert NATIVE_LINE.search(run_tltool("backbones", "mobilenet_v2", env_extra={"TLTOOL_VERBOSE": "1"}).stderr)


def test_the_filter_passes_real_errors_on_even_when_the_process_aborts():
    """A fatal native error is the line users need most: it must survive the filter and a crash right after."""
    code = (
        "import os\n"
        "from tltool.native_logs import filter_process_stderr\n"
        "filter_process_stderr()\n"
        "os.write(2, b'I0000 00:00:1796349709.017001    2301 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'E0000 00:00:1796349713.048444    2301 cuda_platform.cc:52] failed call to cuInit\\n')\n"
        "os.write(2, b'F0000 00:00:1796349713.1 2301 op_kernel.cc:9] Check failed: shape mismatch\\n')\n"
        "os.write(2, b'Error: a line of our own\\n')\n"
        "os.abort()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Check failed: shape mismatch" in done.stderr and "Error: a line of our own" in done.stderr
    assert "port.cc" not in done.stderr and "cuInit" not in done.stderr



# A command run by `tltool.cli.run`, as the program runs one, with a witness of each way a process can end: an
# atexit handler, and an object whose finaliser only the interpreter's teardown would call.
_ENDING = (
    "import atexit, sys\n"
    "class Witness:\n"
    "    def __del__(self):\n"
    "        sys.stdout.write('teardown\\n'); sys.stdout.flush()\n"
    "witness = Witness()\n"
    "atexit.register(lambda: print('atexit handler ran', flush=True))\n"
    "from tltool.cli import run\n"
    "sys.argv = ['tltool', *sys.argv[1:]]\n"
    "print('buffered, not yet flushed', end='')\n"
    "run()\n"
)


@pytest.mark.parametrize("args, code", [(["backbones", "mobilenet_v2"], 0), (["finetune", "no-such.yaml"], 2)])
def test_the_program_ends_without_the_interpreters_teardown_but_with_its_exit_handlers(args, code):
    """Tearing the interpreter down after TensorFlow ran takes 1-1.5 s before the prompt returns: the program
    skips it, yet keeps its exit status, its last output and what atexit handlers do (the stderr filter's
    last lines, TensorFlow's temporary files)."""
    done = subprocess.run([sys.executable, "-c", _ENDING, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert done.stdout.startswith("buffered, not yet flushed")
    assert "atexit handler ran" in done.stdout
    assert "teardown" not in done.stdout  # the interpreter was not torn down
    assert code == 0 or "no-such.yaml" in done.stderr

def test_a_finetune_prints_tltools_lines_one_line_per_epoch_and_one_skip_count(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=6)
    write_broken_files(tmp_path / "broken")
    (data / "red" / "empty.jpg").write_bytes(b"")                                   # found by the scan
    (data / "red" / "text.jpg").write_bytes((tmp_path / "broken" / "text.jpg").read_bytes())  # found by the scan
    (data / "green" / "truncated.jpg").write_bytes((tmp_path / "broken" / "truncated.jpg").read_bytes())  # decoding
    done = run_tltool("finetune", "--data", str(data), "--backbone", "mobilenet_v2", "--out", str(tmp_path / "run"),
                      *tiny_recipe_args())
    assert done.returncode == 0, done.stderr
    assert not NATIVE_LINE.search(done.stderr + done.stdout), done.stderr
    assert "Skipping 2 unreadable file(s)" in done.stdout
    assert "3 unreadable file(s) skipped (1 of them found only while decoding)" in done.stdout
    # Written to a pipe (a log), progress is one plain line per epoch and per extraction: no bars redrawn
    # with carriage returns, no colour codes.
    assert "\r" not in done.stdout and "\x1b[" not in done.stdout, done.stdout
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines[-1].startswith("Next: tltool export ")
    # Every line is Keras's epoch progress or one of tltool's sentences (not "WARNING:absl:..." and the like).
    keras_progress = re.compile(r"^(Epoch \d+/\d+|\s*\d+/(\d+|Unknown) - \d+s)")
    tltool_sentence = re.compile(r"^(tltool: |[A-Z][a-z])")
    for line in lines:
        assert keras_progress.match(line) or tltool_sentence.match(line.rstrip()), line


@pytest.mark.parametrize("command", [["--help"], ["finetune", "--help"], ["tune", "--help"], ["evaluate", "--help"],
                                     ["export", "--help"], ["predict", "--help"], ["data", "check", "--help"],
                                     ["stylize", "--help"]])
def test_help_keeps_each_example_on_its_own_line(command):
    shown = CliRunner().invoke(main, command, terminal_width=80).output
    examples = [line for line in shown.splitlines() if line.strip().startswith("tltool ")]
    assert len(examples) >= 2, shown
    assert all(line.strip().count("tltool ") == 1 for line in examples), shown
