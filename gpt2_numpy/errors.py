"""The one exception type a user is meant to see.

Anything the user can fix (a bad flag, a missing file, no network) is raised as `GPT2Error` with a
one-line message; `main.py` prints it and exits with status 2 instead of showing a traceback.
"""


class GPT2Error(Exception):
    """A problem with the user's input or environment, explained in one line."""


class DamagedFile(GPT2Error):
    """A model file that is damaged, or that disagrees with the folder's other files.

    The message is the problem and then how to repair it. The repair depends on where the folder
    came from, which only the caller knows: a downloaded size is fetched again once the file is
    deleted, a folder the user named is not (load.load_model sets `advice` for that case).
    """

    REDOWNLOAD = "delete it and run again to re-download"

    def __init__(self, problem: str, advice: str = REDOWNLOAD):
        super().__init__(problem)
        self.problem, self.advice = problem, advice

    def __str__(self) -> str:
        return f"{self.problem}; {self.advice}"
