"""The one error type users see. Every stage raises it for problems with an engine directory, a model
folder or a user's input; the CLI shows it as one line (never a traceback)."""


class EngineError(Exception):
    """A problem with an engine directory, a model folder or a user's input, shown as one line."""


def first_line(error: BaseException) -> str:
    """A library error's first line (its name when it has no text): what the one-line message quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class UsageMistake(EngineError):
    """A mistake in how a command was called (flags that do not go together, a value of the wrong form):
    the CLI shows it as one line and exits 2, like a mistyped flag."""
