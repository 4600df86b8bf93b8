"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class EdgetokError(Exception):
    """A user-facing error: the message names the bad value and the fix, on one line."""
