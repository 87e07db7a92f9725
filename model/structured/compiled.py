"""numba's `njit` for the structured-output loops, kept working where no cache directory is writable.

With `cache=True` numba stores compiled code next to the source (`__pycache__`) or in the user's cache
directory (`NUMBA_CACHE_DIR`), and raises at import when neither is writable (a read-only install without a
writable home, for instance). Such a process then compiles without the on-disk cache: every fresh process
pays the compilation (seconds, done by `warmup.warm_up` at start-up), and nothing else changes.
"""

from __future__ import annotations

import logging

import numba

log = logging.getLogger(__name__)
_warned: list[str] = []  # one warning per process, not one per function


def njit(**options):
    """`numba.njit(**options)` as a decorator; `cache=True` falls back to no cache when numba finds no
    writable cache location."""

    def wrap(fn):
        try:
            return numba.njit(**options)(fn)
        except RuntimeError as err:  # numba: "cannot cache function ...: no locator available for file ..."
            if not options.get("cache"):
                raise
            if not _warned:
                _warned.append(fn.__qualname__)
                log.warning("numba cache unavailable (%s): compiling without it", err)
            return numba.njit(**{**options, "cache": False})(fn)

    return wrap
