"""The exceptions tltool raises for problems a user can fix.

Every one of them carries a single line that says what is wrong and what to do. The CLI turns them into
that line and an exit code, never a traceback. Anything else that escapes is a bug in tltool.
"""


class TltoolError(Exception):
    """Base class: a problem with what the user asked for, explained in one line."""

    #: Exit code the CLI uses: 2 for bad input (recipe, folders, flags), 1 for a failed operation.
    exit_code = 1


class RecipeError(TltoolError):
    """The recipe (or an override of it) is invalid."""

    exit_code = 2


class DataError(TltoolError):
    """An image folder is missing, empty or unusable."""

    exit_code = 2


class BackboneError(TltoolError):
    """Unknown backbone, or a configuration the backbone cannot take (e.g. image size)."""

    exit_code = 2


class WeightsError(TltoolError):
    """Pretrained weights cannot be had (offline, missing or mismatched file)."""

    exit_code = 2


class RunDirError(TltoolError):
    """A run directory is missing, incomplete, or would be overwritten."""

    exit_code = 2


class TrainingError(TltoolError):
    """Training failed in a way the user can act on (the loss diverged)."""

    exit_code = 1


class ExportError(TltoolError):
    """An export failed or did not pass its own parity check."""

    exit_code = 1


class ExportOptionError(ExportError):
    """An export was asked for with options that do not fit (format, quantization, missing package)."""

    exit_code = 2


class TuneError(TltoolError):
    """A search cannot run as set up (distributed settings, output folder)."""

    exit_code = 2


class SearchFailedError(TuneError):
    """A search ran but no trial succeeded."""

    exit_code = 1


class CacheError(TltoolError):
    """The feature cache cannot be read or changed (permissions, a full disk)."""


class WorkerLostError(TltoolError):
    """A worker of a multi-worker run stopped answering; the run is resumable once it is back."""

    exit_code = 1
