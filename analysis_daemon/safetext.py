"""Peer-supplied text made safe for logs and terminals, and rate-limited repeated warnings.

Run names, host names, tensor names, meta values and token strings come from the network. Written
raw, a newline forges a log line and an escape sequence reaches the terminal of whoever runs
`./launch.sh tail`. `safe()` is the one helper every such string goes through; `SafeFormatter`
applies it to every log message as a last line of defence.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import unicodedata
from typing import Any

MAX_FIELD_CHARS = 120  # one peer-supplied value in a log line
MAX_LINE_CHARS = 4000  # one whole log message

# C0/C1 controls, DEL, and the Unicode format/separator characters that reorder or break lines
# (bidi overrides, zero-width joiners, line/paragraph separators).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: Any, max_chars: int = MAX_FIELD_CHARS) -> str:
    """`value` as text with control/format characters escaped (\\x1b...) and cut to `max_chars`."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - max_chars
    if cut > 0:
        text = text[:max_chars]
    text = _UNSAFE.sub(_escape, text)
    # Surrogates (msgpack lets them through as str) cannot be encoded by a log file handler.
    if any(unicodedata.category(c) == "Cs" for c in text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8", "replace")
    return f"{text}...(+{cut} chars)" if cut > 0 else text


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`: an exception in one log line or record field."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class SafeFormatter(logging.Formatter):
    """A formatter whose message part is passed through `safe()` (tracebacks keep their newlines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = safe(record.message, MAX_LINE_CHARS)
        return super().formatMessage(record)


def reason_key(reason: str) -> str:
    """A rejection reason with its varying parts (numbers, quoted values) removed: one key per kind."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "Q", reason)
    text = re.sub(r"\d+", "N", text)
    return text[:80]


class RateLimiter:
    """At most one log line per key per `interval` seconds; the next line says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, max_keys: int = 1024) -> None:
        self.logger, self.interval, self.max_keys = logger, interval, max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()
        self.total_suppressed = 0

    def log(self, level: int, key: str, msg: str, *args: Any) -> bool:
        """Log `msg % args` unless `key` was logged within the interval; True when it was logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                self.total_suppressed += 1
                return False
            if key not in self._last and len(self._last) >= self.max_keys:
                # A peer inventing reasons must not grow this table: forget the oldest key.
                oldest = min(self._last, key=self._last.__getitem__)
                self._last.pop(oldest)
                self._suppressed.pop(oldest, None)
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += f" [{suppressed} similar suppressed in the last {self.interval:g} s]"
        self.logger.log(level, msg, *args)
        return True

    def flush(self) -> None:
        """Log the suppressed counts not yet reported (at shutdown)."""
        with self._lock:
            pending, self._suppressed = self._suppressed, {}
        for key, count in pending.items():
            self.logger.warning("%d more message(s) like %r were suppressed", count, key)
