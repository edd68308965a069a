"""The errors a user can act on. `facelora` prints their message (which names the setting,
file or command to change) and exits with status 2; any other exception is a bug and keeps
its traceback."""

from __future__ import annotations


class FaceloraError(Exception):
    """Base of every user-facing error: the message says what to change."""


class SettingsError(FaceloraError, ValueError):
    """A setting or argument has a value facelora cannot use."""


class MissingInput(FaceloraError, FileNotFoundError):
    """A file or folder the user must provide (or a step must produce first) is not there."""


class RefusedInput(FaceloraError, FileExistsError):
    """An output location holds something facelora will not overwrite."""


class ModelFileMissing(MissingInput):
    """A configured model file is absent; the message names the params.yaml setting."""


class EnvironmentProblem(FaceloraError, RuntimeError):
    """Something outside the settings must change: a package to install, a launcher, a job."""
