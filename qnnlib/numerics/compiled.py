"""numba, when the ``fast`` extra installed it: the one place qnnlib compiles loops.

Every compiled function in qnnlib has a numpy counterpart that computes the same values, so numba
changes speed, never results. :func:`compiled` returns the plain Python function when numba is
missing; callers choose between the compiled loop and the numpy path with :func:`available`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

try:
    import numba
except ImportError:  # the fast extra is not installed: numpy paths only
    numba = None  # type: ignore[assignment]

_F = TypeVar("_F", bound=Callable[..., Any])


def available() -> bool:
    """Whether numba is installed."""
    return numba is not None


def compiled(fn: _F) -> _F:
    """``fn`` compiled by numba (no Python objects, GIL released, cached on disk); ``fn`` itself without numba."""
    if numba is None:
        return fn
    try:
        return cast(_F, numba.njit(cache=True, nogil=True)(fn))
    except RuntimeError:  # numba finds no writable cache directory: compile in each process instead
        return cast(_F, numba.njit(nogil=True)(fn))
