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
