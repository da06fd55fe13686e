"""The one exception type users see: the CLI prints its message, never a traceback."""


class TunesmithError(Exception):
    """A problem the user can fix (bad config, bad data, missing file); the message says how."""
