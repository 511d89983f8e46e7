"""Progress bars only on a terminal: in a log file (stderr not a tty) tqdm's carriage-return frames would pile up
into one huge line, so there the bar is off and the callers' own per-epoch / per-step log lines remain."""
from __future__ import annotations

import sys


def bar(iterable=None, **kw):
    """``tqdm(iterable, **kw)``, with ``disable=True`` unless stderr is a terminal (or when the caller disables it)."""
    from tqdm.auto import tqdm

    kw["disable"] = bool(kw.get("disable", False)) or not _is_tty(sys.stderr)
    return tqdm(iterable, **kw)


def _is_tty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False
