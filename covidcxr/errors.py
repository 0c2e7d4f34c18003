"""Errors that the command-line tools turn into one clear line and a non-zero exit."""


class CovidCXRError(Exception):
    """A problem the user can fix: the message names the path and what to do."""


class DataError(CovidCXRError):
    """Bad or missing input data."""


class ConfigError(CovidCXRError):
    """Bad command-line or config values (unknown architecture, bad split...)."""


class RunExistsError(CovidCXRError):
    """An output that already exists would be overwritten."""


EXIT_USAGE = 2            # bad arguments or data: nothing useful was produced
EXIT_EXPORT_FAILED = 3    # train: the run finished and is complete; only its export failed (retry it)


class ExportFailedError(CovidCXRError):
    """A training run that succeeded, whose export after training failed: the run folder is
    complete; the message gives the command that retries the export."""

    exit_code = EXIT_EXPORT_FAILED
