"""Errors as people read them: one line each, in a failed-input row or a command's error."""

from __future__ import annotations

import re
import signal
import sys
import threading
from types import FrameType

NAMED_UNREADABLE = 100  # unreadable files a report names (evaluate, probe); its count is of all of them


class Failed(Exception):
    """A command that started and then failed, with one line of why: exit status 1, no traceback."""


def unwrapped(error: BaseException) -> BaseException:
    """One of colorize's own errors that a Ray task raised, where ``error`` is Ray's wrapping of it.

    Ray re-raises a task's error as a ``RayTaskError`` subclass of its type, whose message is
    the whole remote traceback (in ANSI colour): the one-line error inside is its ``cause``.
    Any other error (a bug, say) keeps the traceback that tells where it came from.
    """
    ray_exceptions = sys.modules.get("ray.exceptions")  # not imported here: Ray is slow to import
    if ray_exceptions is not None and isinstance(error, ray_exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, BaseException) and type(cause).__module__.startswith("colorize."):
            return cause
    return error


def stop_on_sigterm() -> None:
    """From now on, SIGTERM (``kill``, a Ray job stopped, a pod evicted) stops this command as
    Ctrl-C does: exit status 130 and a line. Set where a command starts, and again once
    ``ray.init`` has put its own handler in (see :func:`colorize.raycluster.connect`)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_ctrl_c)


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    """SIGTERM's handler. ``ray.init`` leaves one that dumped a stack and, in training, ended in
    an abort (exit status 134); Ctrl-C's path stops the run cleanly, saying how to resume it.
    That path is called here, not sent a SIGINT: Ray blocks SIGINT in a job's driver, and a
    shell ignores it in a background one."""
    on_ctrl_c = signal.getsignal(signal.SIGINT)
    if callable(on_ctrl_c):  # Python's raises KeyboardInterrupt; Ray Train's, while it trains, stops the workers
        on_ctrl_c(signal.SIGINT, frame)
    else:  # ignored (a background job) or never set
        raise KeyboardInterrupt


def innermost(error: BaseException) -> BaseException:
    """What a Ray task raised, of any type, out of however many ``RayTaskError`` wrappings it
    came through (a task inside a task): for a one-line summary, where the remote traceback
    has been logged already."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    while ray_exceptions is not None and isinstance(error, ray_exceptions.RayTaskError) \
            and isinstance(error.cause, BaseException) and error.cause is not error:
        error = error.cause
    return error


_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")  # the colours of Ray's remote tracebacks


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, stripped, without terminal colour codes; "" if
    there is none."""
    text = _ANSI_CODES.sub("", text)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def one_line(error: BaseException, *, with_type: bool = True, max_chars: int | None = None) -> str:
    """``error`` in one line: its message's first line, or its type's name where it has none.

    ``with_type`` puts the type first (``KeyError: 'x'``), for errors whose message alone would
    be cryptic; messages written for people (Pillow's, ours) read better without it.
    """
    text = first_line(str(error))
    line = f"{type(error).__name__}: {text}" if text and with_type else text or type(error).__name__
    return clipped(line, max_chars)


def clipped(line: str, max_chars: int | None) -> str:
    """``line``, cut to ``max_chars`` with an ellipsis where it is longer."""
    return line if max_chars is None or len(line) <= max_chars else line[: max_chars - 1] + "…"
