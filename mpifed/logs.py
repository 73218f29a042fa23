"""How mpifed speaks: one logger (`LOG`, named "mpifed"), its levels, and where each record goes.

Library code never prints: it calls `LOG.info(...)`, `LOG.warning(...)` or `LOG.error(...)`, guarded by
whichever rank knows what to say (the hub's first rank, a facility's leader). At the default level a
record reads as mpifed's lines always have: `mpifed: LINE` on stdout, `mpifed: warning: LINE` and
errors on stderr (an error's text is written whole: it names its own command or rank). The level comes
from `MPIFED_LOG` (one of `LEVELS`), which `--quiet` and `--verbose` set for every rank they start:
quiet keeps warnings and errors; verbose adds debug records and puts each record's rank and facility
(`identify`) in front of it. Streams are looked up when a record is written, so redirections and test
captures see it."""
from __future__ import annotations

import logging
import os
import sys

LOG = logging.getLogger("mpifed")
ENV = "MPIFED_LOG"
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
"""MPIFED_LOG's values and the least level each shows."""

_where = {"rank": None, "facility": None}


class _Handler(logging.Handler):
    """Records of `levels` as one flushed line each on the stream `name` names (sys.stdout or sys.stderr,
    looked up per record). One handler per stream, each with its own lock: an error line never waits
    behind a write to a stalled stdout pipe (the watchdog's abort goes through stderr)."""

    def __init__(self, name: str, low: int, high: int) -> None:
        super().__init__()
        self.name_of_stream, self.low, self.high = name, low, high

    def emit(self, record: logging.LogRecord) -> None:
        if not self.low <= record.levelno < self.high:
            return
        try:
            stream = getattr(sys, self.name_of_stream)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed pipe must not take a rank down with it
            pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR or getattr(record, "bare", False):
            line = text  # an error names its own command or rank; the progress line stands alone
        elif record.levelno >= logging.WARNING:
            line = f"mpifed: warning: {text}"
        else:
            line = f"mpifed: {text}"
        if LOG.isEnabledFor(logging.DEBUG) and _where["rank"] is not None:
            where = f"rank {_where['rank']}" + (f", facility {_where['facility']}" if _where["facility"] else "")
            line = f"[{where}] {line}"
        return line


def level_from_env() -> int:
    """The level MPIFED_LOG asks for (normal when unset or not one of LEVELS)."""
    return LEVELS.get(os.environ.get(ENV, "normal"), logging.INFO)


def identify(rank: int | None = None, facility: str | None = None) -> None:
    """The rank and facility this process speaks for (shown in front of each line when verbose)."""
    if rank is not None:
        _where["rank"] = rank
    if facility is not None:
        _where["facility"] = facility


def chatty() -> bool:
    """Whether info lines are shown (not --quiet): for what the command line says besides records."""
    return LOG.isEnabledFor(logging.INFO)


def _install() -> None:
    if any(isinstance(h, _Handler) for h in LOG.handlers):  # a reloaded module must not double every line
        return
    for handler in (_Handler("stdout", logging.NOTSET, logging.WARNING),
                    _Handler("stderr", logging.WARNING, logging.CRITICAL + 1)):
        handler.setFormatter(_Format())
        LOG.addHandler(handler)
    LOG.propagate = False  # the application's own handlers; the root logger stays the caller's
    LOG.setLevel(level_from_env())


_install()
