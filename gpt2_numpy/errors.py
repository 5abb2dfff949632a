"""The one exception type a user is meant to see.

Anything the user can fix (a bad flag, a missing file, no network) is raised as `GPT2Error` with a
one-line message; `main.py` prints it and exits with status 2 instead of showing a traceback.
"""


class GPT2Error(Exception):
    """A problem with the user's input or environment, explained in one line."""
