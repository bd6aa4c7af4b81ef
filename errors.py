"""The one error type users see. Every stage raises it for problems with an engine directory, a model
folder or a user's input; the CLI shows it as one line (never a traceback)."""


class EngineError(Exception):
    """A problem with an engine directory, a model folder or a user's input, shown as one line."""


def first_line(error: BaseException) -> str:
    """A library error's first line (its name when it has no text): what the one-line message quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def not_a_file(path, what: str) -> str:
    """Why `path` is not a regular file, in words: what it is (a folder, a FIFO, a symlink loop...), not
    "does not exist" for everything that cannot be opened as a file."""
    import errno
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"{what} {path} is a broken symlink (to {os.readlink(path)})"
        return f"{what} {path} does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{what} {path} is a symlink loop; point it at a real file"
        return f"{what} {path} cannot be reached ({e.strerror})"
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{what} {path} is {kind}, not a regular file" if kind.startswith("a ") else f"{what} {path} is {kind}"


class UsageMistake(EngineError):
    """A mistake in how a command was called (flags that do not go together, a value of the wrong form):
    the CLI shows it as one line and exits 2, like a mistyped flag."""
