"""Errors meant for the person running the pipeline.

Every stage catches :class:`AgdError` at its entry point and prints the message without a
traceback: the message itself must say what is wrong, where, and what to do about it.
"""


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
