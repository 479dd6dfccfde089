"""`python -m tltool` runs the command line."""

from tltool.cli import run

run()
