"""The project's one error type: the CLI turns it into a single line and a non-zero exit."""


class TprobeError(Exception):
    """A problem the user can fix; the message names the file or option and the fix."""
