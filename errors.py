"""The one error type users see. Every stage raises it for problems with an engine directory, a model
folder or a user's input; the CLI shows it as one line (never a traceback)."""


class EngineError(Exception):
    """A problem with an engine directory, a model folder or a user's input, shown as one line."""
