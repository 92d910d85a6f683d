"""Calibration data: every form a user may pass, validated against the model's inputs.

Accepted forms of ``calib``:

* an iterable (list, generator, ...) of ``{input_name: ndarray}`` feeds;
* for a single-input model, an ndarray (one batch, or samples stacked on a new leading axis) or
  an iterable of ndarrays;
* a Mapping ``{input_name: ndarray}``: one feed;
* any object with onnxruntime's ``CalibrationDataReader`` interface (``get_next()`` returning a
  feed or None);
* ``None``: inputs generated from the model's input specification.

A :class:`FeedSource` is read in full once; later passes replay its first ``replay`` samples
(all of them when ``replay`` is None). Lists and arrays are replayed from memory; one-shot sources
(generators, readers) keep the samples to replay in a private directory in the system temp dir,
removed on :meth:`FeedSource.close` (use it as a context manager). Memory does not grow with the
number of samples and nothing is written to the working directory.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qnnlib.errors import CalibrationDataError, EmptyCalibrationError
from qnnlib.graph.index import declared_dims

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

#: Size given to a dynamic non-batch dimension when data is generated.
GENERATED_DIM = 64
#: Number of samples generated when no calibration data is given.
GENERATED_SAMPLES = 16


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (ints for fixed dims, None or a name for dynamic ones)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        """``name: dtype[d0, d1, ...]`` for messages."""
        dims = "?" if self.shape is None else ", ".join("?" if not isinstance(d, int) else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def input_specs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The specs of the graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        shape = None
        if tt.HasField("shape"):
            shape = declared_dims(tt)
        specs.append(InputSpec(vi.name, dtype, shape))
    return tuple(specs)


def validate_feed(feed: Any, specs: Sequence[InputSpec], sample: int) -> Feed:
    """Check one feed against the inputs; return it as a dict of arrays.

    Raises CalibrationDataError naming the input and the sample for an unknown or missing
    name, a wrong dtype or shape, or NaN/inf values.
    """
    names = [s.name for s in specs]
    if isinstance(feed, np.ndarray) and len(specs) == 1:
        feed = {specs[0].name: feed}
    if not isinstance(feed, Mapping):
        raise CalibrationDataError(
            f"calibration sample {sample} is a {type(feed).__name__}; give a dict {{input_name: ndarray}}"
            f" with the inputs {names}" + (" or an ndarray" if len(specs) == 1 else "")
        )
    unknown = [k for k in feed if k not in names]
    if unknown:
        raise CalibrationDataError(
            f"calibration sample {sample} has input {unknown[0]!r}, which the model does not have; "
            f"the model's inputs are {names}"
        )
    missing = [n for n in names if n not in feed]
    if missing:
        raise CalibrationDataError(
            f"calibration sample {sample} lacks input {missing[0]!r}; every sample must feed {names}"
        )
    out: Feed = {}
    for spec in specs:
        value = feed[spec.name]
        if not isinstance(value, np.ndarray):
            value = np.asarray(value)
        if value.dtype != spec.dtype:
            raise CalibrationDataError(
                f"calibration input {spec.name!r} (sample {sample}) has dtype {value.dtype}, the model "
                f"wants {spec.dtype}; convert it with .astype(np.{spec.dtype.name})"
            )
        if spec.shape is not None:
            ok = len(value.shape) == len(spec.shape) and all(
                not isinstance(d, int) or d in (0, v) for d, v in zip(spec.shape, value.shape, strict=True)
            )
            if not ok:
                raise CalibrationDataError(
                    f"calibration input {spec.name!r} (sample {sample}) has shape {list(value.shape)}, the "
                    f"model declares {spec.describe()}; reshape the data to match"
                )
        if value.dtype.kind in "fc" and value.size and not np.isfinite(value).all():
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise CalibrationDataError(
                f"calibration input {spec.name!r} (sample {sample}) holds {bad} NaN or inf values; "
                "clean or drop that sample"
            )
        if value.size == 0:
            raise CalibrationDataError(
                f"calibration input {spec.name!r} (sample {sample}) is empty (shape {list(value.shape)})"
            )
        out[spec.name] = value
    return out


def _split_array(array: np.ndarray, spec: InputSpec) -> list[np.ndarray]:
    """Split a single-input array into feeds: stacked samples, or a batch split by the batch dim."""
    shape = spec.shape
    if shape is not None and array.ndim == len(shape) + 1:
        return list(array)
    if shape is not None and array.ndim == len(shape) and shape and isinstance(shape[0], int) and shape[0] > 0:
        batch = shape[0]
        if array.shape[0] % batch == 0 and array.shape[0] != batch:
            return [array[i:i + batch] for i in range(0, array.shape[0], batch)]
    return [array]


def _raw_feeds(calib: Any, specs: Sequence[InputSpec]) -> tuple[Iterable[Any], bool]:
    """The user's source as an iterable of raw feeds, and whether it can be iterated again."""
    if isinstance(calib, np.ndarray):
        if len(specs) != 1:
            raise CalibrationDataError(
                f"an ndarray can only calibrate a single-input model; this one has inputs "
                f"{[s.name for s in specs]}: pass dicts {{input_name: ndarray}}"
            )
        return _split_array(calib, specs[0]), True
    if isinstance(calib, Mapping):
        return [dict(calib)], True
    if hasattr(calib, "get_next") and callable(calib.get_next):
        return iter(calib.get_next, None), False
    if isinstance(calib, (list, tuple)):
        return calib, True
    if isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise CalibrationDataError(
            f"cannot read calibration data from a {type(calib).__name__}; pass an iterable of "
            "{input_name: ndarray} dicts, an ndarray, an onnxruntime CalibrationDataReader, or None"
        )
    return calib, False


class _LimitReachedError(Exception):
    """max_samples calibration samples have been read."""


class FeedSource:
    """Validated calibration feeds that can be iterated several times (see the module docstring).

    ``holdout=n`` holds back every n-th sample (indices ``n-1, 2n-1, ...``) from calibration: iterating
    yields the others, :meth:`held_out` yields those. ``replay`` bounds how many calibration samples
    later passes may replay; ``max_samples`` how many are read for calibration.
    """

    def __init__(self, calib: Any, specs: Sequence[InputSpec], *, max_samples: int | None = None,
                 replay: int | None = None, holdout: int = 0, generation: Sequence[str] | None = None) -> None:
        self.specs = tuple(specs)
        self.max_samples = max_samples
        self.replay = replay
        self.holdout = holdout
        #: How generated feeds were drawn (:mod:`qnnlib.calibration.generate`); None for the user's data.
        self.generation = tuple(generation) if generation is not None else None
        self._spool: Path | None = None
        self._spooled: list[Path] = []
        self._held_spooled: list[Path] = []
        if calib is None:
            raise ValueError("FeedSource reads given data; qnnlib.prepare.open_feeds generates it for calib=None")
        raw, reusable = _raw_feeds(calib, self.specs)
        self._items: Sequence[Any] | None = list(raw) if reusable else None
        self._one_shot: Iterator[Any] | None = None if reusable else iter(raw)
        self.num_samples: int | None = None
        self.num_held_out = 0

    @property
    def generated(self) -> bool:
        """Whether the feeds were generated rather than given."""
        return self.generation is not None

    def _held(self, index: int) -> bool:
        return self.holdout > 0 and index % self.holdout == self.holdout - 1

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Feed]:
        if self._items is not None:
            yield from self._iterate_items()
        elif self._one_shot is not None:
            yield from self._spool_one_shot()
        else:
            yield from self._replay(self._spooled)

    def _iterate_items(self) -> Iterator[Feed]:
        assert self._items is not None
        count = held = 0
        for i, raw in enumerate(self._items):
            if self._held(i):
                held += 1
                continue
            if self.max_samples is not None and count >= self.max_samples:
                break
            yield validate_feed(raw, self.specs, i)
            count += 1
        self.num_samples, self.num_held_out = count, held
        if count == 0:
            raise EmptyCalibrationError(_EMPTY)

    def _spool_one_shot(self) -> Iterator[Feed]:
        source, self._one_shot = self._one_shot, None
        assert source is not None
        spool = self._spool = Path(tempfile.mkdtemp(prefix="qnnlib-calib-"))
        index = count = 0

        def store(raw: Any) -> Feed | None:
            """Validate and spool one sample; None for a held-back one; raises _LimitReachedError at max_samples."""
            nonlocal index, count
            i, index = index, index + 1
            feed = validate_feed(raw, self.specs, i)
            keep = self._held(i)
            if not keep and self.max_samples is not None and count >= self.max_samples:
                raise _LimitReachedError
            if keep or self.replay is None or count < self.replay:
                path = spool / f"{i:08d}.npz"
                arrays: dict[str, Any] = dict(feed)
                np.savez(path, **arrays)
                (self._held_spooled if keep else self._spooled).append(path)
            if keep:
                return None
            count += 1
            return feed

        try:
            for raw in source:
                feed = store(raw)
                if feed is not None:
                    yield feed
        except _LimitReachedError:
            pass
        except GeneratorExit:  # the reader stopped early: keep what later passes need
            with contextlib.suppress(_LimitReachedError):
                for raw in source:
                    store(raw)
            raise
        finally:
            self.num_samples, self.num_held_out = count, len(self._held_spooled)
        if count == 0:
            raise EmptyCalibrationError(_EMPTY)

    def _replay(self, paths: Sequence[Path]) -> Iterator[Feed]:
        if self._spool is None:
            raise EmptyCalibrationError(_EMPTY)
        for path in paths:
            with np.load(path) as data:
                yield {name: data[name] for name in data.files}

    def held_out(self) -> Iterator[Feed]:
        """The held-back samples (none unless ``holdout`` was set and the source had enough samples)."""
        if self._items is not None:
            for i, raw in enumerate(self._items):
                if self._held(i):
                    yield validate_feed(raw, self.specs, i)
        else:
            yield from self._replay(self._held_spooled)

    def take(self, n: int) -> Iterator[Feed]:
        """The first ``n`` calibration feeds (all of them when fewer); at most ``replay`` on a replay."""
        if self.replay is not None and n > self.replay and self._one_shot is None and self._items is None:
            raise ValueError(f"only the first {self.replay} samples of a one-shot source are kept, not {n}")
        for i, feed in enumerate(self):
            if i >= n:
                return
            yield feed

    # -- cleanup -----------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the spool directory, if any."""
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def __enter__(self) -> FeedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_EMPTY = ("the calibration data yielded no sample; pass at least one feed, or calib=None to let qnnlib "
          "generate inputs")
