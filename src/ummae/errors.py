"""User-facing errors.

Anything wrong with what the user gave us (a config value, a path, a checkpoint, a mask) raises
`UmmaeError`. The command line prints its message as one line and exits with status 2, so a
mistake never ends in a traceback.
"""


class UmmaeError(Exception):
    """A problem with the user's input, reported as one clear line."""


class ConfigError(UmmaeError, ValueError):
    """An invalid configuration value; the message names the option.

    Also a `ValueError`, as torch and timm raise for bad arguments, so a caller's
    `except ValueError` catches it."""


def first_sentence(error: BaseException) -> str:
    """Another library's message, shortened for a one-line error without cutting it mid-sentence:
    its first line, and of a long line its first sentence ("Type" when there is no text)."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > 160 and ". " in text:
        text = text.split(". ", 1)[0]
    return text or type(error).__name__


def one_line(error: BaseException) -> str:
    """The user-facing line of an error.

    An error raised in a DataLoader worker reaches the main process re-raised as the same type,
    but with the worker's whole traceback as its message ("Caught UmmaeError in DataLoader
    worker process 0. Original Traceback ... UmmaeError: <message>"); keep only the message.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(error).__name__
