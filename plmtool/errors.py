"""User-facing errors: printed as one line, never as a traceback."""


class PlmtoolError(Exception):
    """A problem with the user's input (config, paths, data) that they can fix."""
