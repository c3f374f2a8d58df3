"""The one exception type for errors a user can cause, and Ctrl-C in a run that can go on."""


class FinegrainError(Exception):
    """A problem with user input (a file, a config key, a flag, a data row).

    The message is one line that names the file, line or key and says what to do.
    The CLI prints it as is and exits non-zero; `--debug` shows the traceback.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) in a command whose work can go on; the message says how, and the CLI adds
    it to its "interrupted" line."""


# How a command of several runs (sweep, compare, a continual sequence) goes on after Ctrl-C.
RUN_AGAIN = "the same command again goes on: finished runs are read back, the one it stopped in continues from its checkpoint"
