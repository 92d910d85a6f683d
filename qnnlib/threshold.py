"""The user's accuracy threshold, and the metrics it is checked with.

A :class:`Threshold` is either a metric on the model's outputs against the float model's, with a
bound, or the user's own evaluation function with an allowed drop from the float model's score:

* ``Threshold(metric="cosine", min=0.999)``: mean over samples of the cosine similarity of all
  outputs, concatenated, to the float outputs;
* ``Threshold(metric="sqnr", min=30)``: ``10 log10(sum ref^2 / sum (ref - out)^2)`` over all outputs
  and samples, in dB;
* ``Threshold(metric="top1", min=0.99)``: share of positions (the last axis of the first output is
  the class axis) whose argmax equals the float model's;
* ``Threshold(metric="max_abs", max=0.05)``: largest absolute difference;
* ``Threshold(metric="max_rel", max=0.01)``: largest absolute difference divided by the largest
  absolute float output value;
* ``Threshold(eval_fn=f, max_drop=0.01)``: ``f(session)`` returns a score (higher is better) for an
  onnxruntime session on a model; the quantised model may score at most ``max_drop`` below the float
  one (``relative=True``: at most ``max_drop * |float score|`` below).

A missed threshold returns the best model found with ``report.threshold.met == False``; with
``strict=True`` it raises :class:`~qnnlib.errors.ThresholdError` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qnnlib.errors import ConfigError

#: Metrics whose value must stay at or above ``min``; and those that must stay at or below ``max``.
HIGHER_IS_BETTER = ("cosine", "sqnr", "top1")
LOWER_IS_BETTER = ("max_abs", "max_rel")


@dataclass(frozen=True, kw_only=True)
class Threshold:
    """An accuracy requirement for the quantised model; see the module docstring."""

    metric: str | None = None
    min: float | None = None
    max: float | None = None
    eval_fn: Callable[[Any], float] | None = None
    max_drop: float | None = None
    relative: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        if (self.metric is None) == (self.eval_fn is None):
            raise ConfigError("Threshold needs exactly one of metric=... or eval_fn=...")
        if self.eval_fn is not None:
            self._check_eval_fn()
        else:
            self._check_metric()

    def _check_eval_fn(self) -> None:
        if not callable(self.eval_fn):
            raise ConfigError("Threshold.eval_fn must be callable: f(onnxruntime session) -> score")
        if self.max_drop is None or not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise ConfigError("Threshold(eval_fn=...) needs max_drop >= 0, the allowed drop from the float score")
        if self.min is not None or self.max is not None:
            raise ConfigError("Threshold(eval_fn=...) takes max_drop, not min or max")

    def _check_metric(self) -> None:
        if self.metric in HIGHER_IS_BETTER:
            if self.min is None or self.max is not None:
                raise ConfigError(f"Threshold(metric={self.metric!r}) needs min=..., the lowest acceptable value")
            if self.metric == "cosine" and not -1.0 <= self.min <= 1.0:
                raise ConfigError(f"a cosine threshold lies in [-1, 1], got {self.min}")
            if self.metric == "top1" and not 0.0 <= self.min <= 1.0:
                raise ConfigError(f"a top-1 agreement threshold lies in [0, 1], got {self.min}")
        elif self.metric in LOWER_IS_BETTER:
            if self.max is None or self.min is not None:
                raise ConfigError(f"Threshold(metric={self.metric!r}) needs max=..., the largest acceptable error")
            if self.max < 0:
                raise ConfigError(f"an error threshold is >= 0, got {self.max}")
        else:
            raise ConfigError(f"unknown threshold metric {self.metric!r}; choose one of "
                              f"{HIGHER_IS_BETTER + LOWER_IS_BETTER} or give eval_fn")
        if self.max_drop is not None:
            raise ConfigError("max_drop goes with eval_fn; a metric threshold takes min or max")

    @property
    def name(self) -> str:
        """The metric's name, or ``"eval_fn"``."""
        return self.metric or "eval_fn"

    def describe(self) -> str:
        """``cosine >= 0.999``, ``max_abs <= 0.05`` or ``eval_fn drop <= 0.01``."""
        if self.eval_fn is not None:
            return f"eval_fn drop <= {self.max_drop}{' (relative)' if self.relative else ''}"
        bound = f">= {self.min}" if self.metric in HIGHER_IS_BETTER else f"<= {self.max}"
        return f"{self.metric} {bound}"

    def is_met(self, value: float, float_score: float | None = None) -> bool:
        """Whether a measured ``value`` satisfies the threshold (``float_score`` for eval_fn)."""
        if self.eval_fn is not None:
            assert float_score is not None and self.max_drop is not None
            allowed = self.max_drop * abs(float_score) if self.relative else self.max_drop
            return float_score - value <= allowed
        if self.metric in HIGHER_IS_BETTER:
            return value >= self.min  # type: ignore[operator]
        return value <= self.max  # type: ignore[operator]

    def better(self, a: float, b: float) -> bool:
        """Whether value ``a`` is better than ``b``."""
        return a < b if self.metric in LOWER_IS_BETTER else a > b


def output_metric(metric: str, reference: Sequence[Sequence[np.ndarray]],
                  test: Sequence[Sequence[np.ndarray]]) -> float:
    """``metric`` of the quantised outputs ``test`` against the float ``reference``, one list per sample."""
    pairs = [(np.concatenate([np.asarray(o, np.float64).ravel() for o in r]),
              np.concatenate([np.asarray(o, np.float64).ravel() for o in t]))
             for r, t in zip(reference, test, strict=True)]
    if metric == "cosine":
        return float(np.mean([_cosine(r, t) for r, t in pairs]))
    if metric == "sqnr":
        signal = sum(float(r @ r) for r, _ in pairs)
        noise = sum(float((r - t) @ (r - t)) for r, t in pairs)
        return math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
    if metric == "top1":
        same = [np.argmax(np.asarray(r[0]), axis=-1) == np.argmax(np.asarray(t[0]), axis=-1)
                for r, t in zip(reference, test, strict=True)]
        return float(np.mean(np.concatenate([np.ravel(s) for s in same])))
    if metric == "max_abs":
        return max(float(np.max(np.abs(r - t), initial=0.0)) for r, t in pairs)
    if metric == "max_rel":
        scale = max(float(np.max(np.abs(r), initial=0.0)) for r, _ in pairs)
        worst = max(float(np.max(np.abs(r - t), initial=0.0)) for r, t in pairs)
        return 0.0 if worst == 0 else (math.inf if scale == 0 else worst / scale)
    raise ValueError(f"unknown metric {metric!r}")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denom == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b) / denom
