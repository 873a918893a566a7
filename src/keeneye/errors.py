"""Exceptions that carry a message meant for the user (the CLI prints it without a traceback)."""


class KeeneyeError(Exception):
    """Base for errors caused by the user's input or environment, not by a bug."""

    exit_code = 1


class ConfigError(KeeneyeError):
    """The config file or an override is missing, malformed or invalid."""

    exit_code = 2


class DataError(KeeneyeError):
    """The data folder or manifest cannot be used as it is (wrong layout, too many bad files)."""

    exit_code = 2


class WeightsError(KeeneyeError):
    """The backbone's pretrained weights could not be found or loaded."""

    exit_code = 2


class BundleError(KeeneyeError):
    """A model bundle is missing, incomplete or unreadable."""

    exit_code = 2
