"""Errors that the command-line tools turn into one clear line and a non-zero exit."""


class CovidCXRError(Exception):
    """A problem the user can fix: the message names the path and what to do."""


class DataError(CovidCXRError):
    """Bad or missing input data."""


class ConfigError(CovidCXRError):
    """Bad command-line or config values (unknown architecture, bad split...)."""


class RunExistsError(CovidCXRError):
    """An output that already exists would be overwritten."""
