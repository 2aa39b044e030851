"""Errors meant for the person running the pipeline.

Every stage catches :class:`AgdError` at its entry point and prints the message without a
traceback: the message itself must say what is wrong, where, and what to do about it. A message
that tells the user to run one of the commands names it with :func:`command_line`, as they started
it (``python -m stages.train`` in the repository, ``agd train`` installed).
"""

import contextlib

# How the running command was started, as its help and messages show it: `python -m stages.<name>`
# in the repository (what dvc.yaml runs), `agd <name>` when the installed command started it.
_launcher = ["python -m stages.{}"]


def command_line(name: str) -> str:
    """The command ``name`` as the user typed it (``python -m stages.train`` or ``agd train``), for
    its usage line and for every message that says what to run."""
    return _launcher[-1].format(name)


@contextlib.contextmanager
def launched_as(template: str):
    """Within the block, :func:`command_line` formats ``template`` (``"agd {}"``): set by the ``agd``
    dispatcher around the command it runs, and undone afterwards for in-process callers."""
    _launcher.append(template)
    try:
        yield
    finally:
        _launcher.pop()


class AgdError(Exception):
    """A problem with the user's input or files, explained in the message."""


class ConfigError(AgdError):
    """A params.yaml key or command-line option has a value we cannot use."""


class StoreError(AgdError):
    """The trajectory store is missing, incomplete, corrupted or does not match its manifest."""


class ModelError(AgdError):
    """A base model or adapter folder cannot be loaded or does not fit."""


def os_reason(err: OSError) -> str:
    """A short, plain reason for a failed file operation (disk full, permission denied, ...)."""
    import errno

    return {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a path component is a file, not a folder",
            errno.EISDIR: "it is a folder, not a file"}.get(err.errno, err.strerror or str(err))


class WriteError(AgdError):
    """A file could not be written (disk full, permission); ``reason`` says why in plain words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def write_errors() -> tuple[type[BaseException], ...]:
    """What a write of a file or of safetensors can fail with: safetensors raises its own error (not
    OSError) for a full disk, "Error while serializing: IoError(Os { code: 28, ... })"."""
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def write_reason(err: BaseException) -> str:
    """Why a write failed, in plain words (the disk is full, permission denied, ...), also for
    safetensors' own error, whose message carries the operating system's error code."""
    import os
    import re

    if isinstance(err, WriteError):
        return err.reason
    if isinstance(err, OSError):
        return os_reason(err)
    code = re.search(r"code: (\d+)", str(err))
    if code:
        number = int(code.group(1))
        return os_reason(OSError(number, os.strerror(number)))
    return " ".join(str(err).split())[:300] or type(err).__name__


class MissingExtra(AgdError):
    """An optional package that one feature needs is not installed; the message names the extra."""


# import name -> (what pip calls it, the agd-pipeline extra that installs it)
EXTRAS = {"matplotlib": ("matplotlib", "eval"), "cleanfid": ("clean-fid", "eval"), "sklearn": ("scikit-learn", "eval"),
          "scipy": ("scipy", "eval"), "torchvision": ("torchvision", "eval"), "peft": ("peft", "finetune"),
          "distributed": ("dask[distributed]", "distributed"), "dvc": ("dvc", "repro")}


def require(module: str, purpose: str):
    """Import the optional package ``module`` (a key of :data:`EXTRAS`, or a submodule of one) for
    ``purpose`` and return it, or raise :class:`MissingExtra` naming the extra to install. The core
    install (``pip install agd-pipeline``) leaves these packages out so that it keeps the user's torch
    and stays small; each is imported through here, inside the function that needs it, never when the
    library loads. A package that is there but lacks one of its own optional imports (clean-fid
    without torchvision) is explained the same way."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in EXTRAS:
            raise  # not one of our extras' packages: a broken installation, keep the traceback
        package, extra = EXTRAS[missing]
        raise MissingExtra(f"{purpose}: needs {package}, which is not installed; "
                           f"pip install 'agd-pipeline[{extra}]' installs it") from None
