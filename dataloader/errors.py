"""The one exception type for bad user input (files, flags, checkpoints).

Command-line entry points catch it, print its message as a single line and exit with code 2,
so a user sees `path:line: what was expected` instead of a traceback.
"""


class UserInputError(Exception):
    """Bad input that the user can fix: a file, a line, a flag or a checkpoint."""
