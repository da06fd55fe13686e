"""The one exception type users see: the CLI prints its message, never a traceback."""


class TunesmithError(Exception):
    """A problem the user can fix (bad config, bad data, missing file); the message says how."""


STOPPED_EXIT_CODE = 75
"""Exit status of a run that stopped on request (SIGTERM, SIGUSR1, Ctrl-C) after writing a checkpoint:
EX_TEMPFAIL, "try again later"; resuming continues it."""


class TrainingStopped(TunesmithError):
    """Training stopped on request after writing a checkpoint; resuming continues it."""
