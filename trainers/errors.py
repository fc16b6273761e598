"""Errors of the training layer that the orchestrator reports as one line before Ray starts."""


class DataError(ValueError):
    """The data folder is missing, incomplete or not in the expected format."""
