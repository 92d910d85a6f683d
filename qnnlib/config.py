"""User-facing configuration: frozen, keyword-only dataclasses validated on construction."""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from qnnlib.calibration.methods import METHODS, CalibrationMethod, method_from_name
from qnnlib.errors import ConfigError
from qnnlib.numerics.affine import is_power_of_two
from qnnlib.numerics.qtypes import ACTIVATION_TYPES, WEIGHT_TYPES, qtype
from qnnlib.threshold import Threshold

#: The calibration method used when none is given (see docs/concepts.md for the measurements).
DEFAULT_METHOD = "percentile"
#: Values of QuantConfig.overflow_fix.
OVERFLOW_FIXES = ("pairs", "first_layer", "enable", "disable")
#: Errors the range search can minimise.
OBJECTIVES = ("mse", "cosine")
#: Precisions a layer can take (int8 first: every model starts there).
PRECISIONS = ("int8", "int4", "int16", "float")
#: Costs a mixed-precision search can minimise by name (a callable is also accepted).
COSTS = ("bytes", "bitops")


@dataclass(frozen=True, kw_only=True)
class TensorOverride:
    """Fix an activation tensor's quantisation: a calibration ``range`` or an exact ``scale``/``zero_point``.

    The override applies to the tensor's whole tied group, since the group shares one parameter set.
    """

    range: tuple[float, float] | None = None
    scale: float | None = None
    zero_point: int | None = None

    def __post_init__(self) -> None:
        if self.range is not None:
            if len(self.range) != 2 or not all(math.isfinite(v) for v in self.range):
                raise ConfigError(f"TensorOverride.range must be two finite floats (lo, hi), got {self.range!r}")
            if self.range[0] > self.range[1]:
                raise ConfigError(f"TensorOverride.range must have lo <= hi, got {self.range!r}")
            if self.scale is not None or self.zero_point is not None:
                raise ConfigError("give TensorOverride either range or scale and zero_point, not both")
        if (self.scale is None) != (self.zero_point is None):
            raise ConfigError("TensorOverride.scale and zero_point go together; give both")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"TensorOverride.scale must be a positive finite float, got {self.scale!r}")
        if self.range is None and self.scale is None:
            raise ConfigError("TensorOverride needs range=(lo, hi) or scale= and zero_point=")


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantise. Every field has a default that suits onnxruntime on x86 CPUs.

    * ``activation_type``: ``"uint8"`` (default; asymmetric, the fast path on x86) or ``"int8"``.
    * ``activation_symmetric``: zero point 0 for activations (needs ``int8``).
    * ``weight_type``: ``"int8"``, symmetric; ``per_channel`` along each layer's output channels.
    * ``power_of_two_scales``: every scale a power of two (activations rounded up, weights per channel
      to the power of two of least error), so each requantisation ``s_x * s_w / s_y`` is a shift:
      for fixed-point devices without multipliers (the coprocessor's ``pot`` policy). Tied groups share
      one scale as always, so their shifts agree.
    * ``overflow_fix``: x86 CPUs without VNNI add u8 x s8 product pairs in a saturating int16.
      ``"pairs"`` (default) gives each output channel whose same-sign weight pairs could saturate just
      enough range that none can (at most one bit, only on those channels); ``"first_layer"`` gives
      int8 weights 7 bits of range in layers that read a model input, ``"enable"`` in every layer;
      ``"disable"`` for targets without the problem (VNNI, ARM, GPU).
    * ``method``: calibration method, a name (``"minmax"``, ``"percentile"``, ``"entropy"``,
      ``"mse"``) or a method object such as ``Percentile(99.99)``.
    * ``exclude``: node names or glob patterns to keep in float; ``exclude_op_types``: op types.
    * ``overrides``: ``{tensor_name: TensorOverride(...)}``.
    * ``max_calibration_samples``: read at most this many calibration samples.
    * ``report_samples``: samples used to measure per-layer SQNR for the report (0 to skip).
    * ``fold_batchnorm``: fold BatchNormalization into the preceding Conv.
    * ``float_log_inputs``: keep every op feeding a Log float, up to an exponential op (an audio
      front end: STFT or CQT as Conv, magnitudes, Log), where 8-bit steps would zero the quiet bins.
    * ``verify_fusion``: check in onnxruntime's optimised graph that integer kernels replaced the layers.
    * ``seed``: seed for generated calibration data.
    * ``input_ranges``: ``{input_name: (low, high)}``, the value range of an input, used only when
      calibration data is generated (``calib=None``): for a model that implies nothing about its
      inputs' scale, such as one reading raw 0-255 pixels without a normalisation or BatchNormalization.
    * ``threshold``: a :class:`~qnnlib.threshold.Threshold` the quantised model must meet on validation
      data; layers that hurt most are raised to 16-bit, then float, until it is (see docs/threshold.md).
    * ``optimize``: search each group's range by the error at the layers that read it, and weight
      clipping by MSE; None (default) means "when a threshold is given".
    * ``objective``: ``"mse"`` or ``"cosine"``, the error the range search minimises.
    * ``optimize_samples``: calibration samples the range search uses.
    * ``precisions``: precisions layers may take: ``"int8"`` and any of ``"int4"``, ``"int16"``,
      ``"float"``. Without ``"int4"`` a threshold raises the groups that hurt most (docs/threshold.md);
      with it each tied group gets the precision that meets the threshold at the least ``cost``
      (mixed precision, docs/sensitivity.md), which needs a threshold or a cost limit.
    * ``cost``: what mixed precision minimises: ``"bytes"`` (weight bytes, default), ``"bitops"``
      (multiply-accumulates times weight bits times activation bits) or a callable
      ``cost(group, precision) -> float`` over :class:`~qnnlib.sensitivity.GroupSensitivity` entries.
    * ``max_cost``, ``max_above_int8``: a point by cost for mixed precision: at most this ``cost``, at
      most this share (0-1) of the weighted layers at int16 or float. With a threshold, the cheapest
      point meeting it within the limits; without one, the least estimated error within them.
    """

    activation_type: str = "uint8"
    activation_symmetric: bool = False
    weight_type: str = "int8"
    per_channel: bool = True
    power_of_two_scales: bool = False
    overflow_fix: str = "pairs"
    method: str | CalibrationMethod = DEFAULT_METHOD
    exclude: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    overrides: Mapping[str, TensorOverride] = field(default_factory=dict)
    max_calibration_samples: int | None = None
    report_samples: int = 4
    fold_batchnorm: bool = True
    float_log_inputs: bool = True
    verify_fusion: bool = True
    seed: int = 0
    input_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    threshold: Threshold | None = None
    optimize: bool | None = None
    objective: str = "mse"
    optimize_samples: int = 4
    precisions: tuple[str, ...] = ("int8", "int16", "float")
    cost: str | Callable[..., float] = "bytes"
    max_cost: float | None = None
    max_above_int8: float | None = None

    def __post_init__(self) -> None:
        self._check_types()
        object.__setattr__(self, "method", _method(self.method))
        for name in ("exclude", "exclude_op_types"):
            object.__setattr__(self, name, _names(name, getattr(self, name)))
        object.__setattr__(self, "overrides", _overrides(self.overrides, power_of_two=self.power_of_two_scales))
        object.__setattr__(self, "input_ranges", _input_ranges(self.input_ranges))
        if self.max_calibration_samples is not None and self.max_calibration_samples < 1:
            raise ConfigError(f"max_calibration_samples must be >= 1 or None, got {self.max_calibration_samples}")
        if self.report_samples < 0:
            raise ConfigError(f"report_samples must be >= 0, got {self.report_samples}")
        if self.threshold is not None and not isinstance(self.threshold, Threshold):
            raise ConfigError(f"threshold must be a qnnlib.Threshold, got {type(self.threshold).__name__}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.optimize_samples < 1:
            raise ConfigError(f"optimize_samples must be >= 1, got {self.optimize_samples}")
        precisions = _names("precisions", self.precisions)
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown or "int8" not in precisions:
            raise ConfigError(f"precisions must include 'int8' and may add {PRECISIONS[1:]}, got {precisions!r}")
        object.__setattr__(self, "precisions", precisions)
        if not callable(self.cost) and self.cost not in COSTS:
            raise ConfigError(f"cost must be one of {COSTS} or a callable cost(group, precision), got {self.cost!r}")
        if self.max_cost is not None and not (math.isfinite(self.max_cost) and self.max_cost > 0):
            raise ConfigError(f"max_cost must be a positive number, got {self.max_cost!r}")
        if self.max_above_int8 is not None and not 0.0 <= self.max_above_int8 <= 1.0:
            raise ConfigError(f"max_above_int8 is a share of the layers, from 0 to 1; got {self.max_above_int8!r}")
        limited = self.max_cost is not None or self.max_above_int8 is not None
        if limited and not self.mixed:
            raise ConfigError("max_cost and max_above_int8 choose a mixed-precision point; add 'int4' to "
                              "precisions, e.g. precisions=('int4', 'int8', 'int16', 'float')")
        if self.mixed and self.threshold is None and not limited:
            raise ConfigError("precisions with 'int4' choose a precision per group under a threshold or a cost "
                              "limit; give QuantConfig(threshold=qnnlib.Threshold(...)) or max_cost / "
                              "max_above_int8, or leave 'int4' out")

    @property
    def mixed(self) -> bool:
        """Whether each tied group's precision is searched (``"int4"`` among the precisions)."""
        return "int4" in self.precisions

    def _check_types(self) -> None:
        if self.activation_type not in ACTIVATION_TYPES:
            raise ConfigError(f"activation_type must be one of {ACTIVATION_TYPES}, got {self.activation_type!r}")
        if self.activation_symmetric and not qtype(self.activation_type).signed:
            raise ConfigError(
                f"activation_symmetric=True needs a signed type, got {self.activation_type!r}; "
                "use activation_type='int8'"
            )
        if self.weight_type not in WEIGHT_TYPES:
            raise ConfigError(f"weight_type must be one of {WEIGHT_TYPES}, got {self.weight_type!r}")
        if self.overflow_fix not in OVERFLOW_FIXES:
            raise ConfigError(f"overflow_fix must be one of {OVERFLOW_FIXES}, got {self.overflow_fix!r}")

    @property
    def optimizing(self) -> bool:
        """Whether ranges and weight clipping are searched: ``optimize``, or a threshold is given."""
        return self.optimize if self.optimize is not None else self.threshold is not None

    @property
    def calibration(self) -> CalibrationMethod:
        """The calibration method object."""
        return self.method  # type: ignore[return-value]

    def summary(self) -> dict[str, object]:
        """A JSON-friendly view for the report."""
        method = self.calibration
        return {
            "activation_type": self.activation_type,
            "activation_symmetric": self.activation_symmetric,
            "weight_type": self.weight_type,
            "per_channel": self.per_channel,
            "float_log_inputs": self.float_log_inputs,
            "power_of_two_scales": self.power_of_two_scales,
            "overflow_fix": self.overflow_fix,
            "method": {"name": method.name, **vars(method)},
            "exclude": list(self.exclude),
            "exclude_op_types": list(self.exclude_op_types),
            "overrides": {k: {f: getattr(v, f) for f in ("range", "scale", "zero_point")}
                          for k, v in self.overrides.items()},
            "threshold": self.threshold.describe() if self.threshold is not None else None,
            "optimize": self.optimizing,
            "objective": self.objective,
            "precisions": list(self.precisions),
            "input_ranges": {k: list(v) for k, v in self.input_ranges.items()},
            "max_cost": self.max_cost,
            "max_above_int8": self.max_above_int8,
            "cost": self.cost if isinstance(self.cost, str) else getattr(self.cost, "__name__", "callable"),
        }


def _method(method: object) -> CalibrationMethod:
    """A calibration method object from a name or an object; ConfigError otherwise."""
    if isinstance(method, str):
        try:
            return method_from_name(method)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if not isinstance(method, tuple(METHODS.values())):
        raise ConfigError(f"method must be a name in {sorted(METHODS)} or a method object, got {type(method).__name__}")
    return method  # type: ignore[return-value]


def _names(field_name: str, value: object) -> tuple[str, ...]:
    """A tuple of strings (a lone string becomes a 1-tuple); ConfigError otherwise."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{field_name} must be a tuple of strings, got {value!r}")
    return tuple(value)


def _overrides(value: object, *, power_of_two: bool) -> Mapping[str, TensorOverride]:
    """A read-only copy of the overrides mapping; ConfigError on a wrong type.

    With ``power_of_two`` (power_of_two_scales=True) an explicit ``scale`` must be a power of two.
    """
    if not isinstance(value, Mapping):
        raise ConfigError(f"overrides must map tensor names to TensorOverride, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, TensorOverride):
            raise ConfigError(f"overrides[{key!r}] must be a TensorOverride, got {type(item).__name__}")
        if power_of_two and item.scale is not None and not is_power_of_two(item.scale):
            raise ConfigError(
                f"overrides[{key!r}].scale = {item.scale!r} is not a power of two, but power_of_two_scales=True; "
                f"use scale={2.0 ** math.ceil(math.log2(item.scale))!r} or give a range instead"
            )
    return types.MappingProxyType(dict(value))


def _input_ranges(value: object) -> Mapping[str, tuple[float, float]]:
    """A read-only ``{name: (low, high)}`` with finite ``low < high``; ConfigError otherwise."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"input_ranges must map input names to (low, high), got {type(value).__name__}")
    ranges = {}
    for key, pair in value.items():
        try:
            low, high = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ConfigError(f"input_ranges[{key!r}] must be a pair (low, high) of numbers, got {pair!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"input_ranges[{key!r}] must have finite low < high, got ({low}, {high})")
        ranges[str(key)] = (low, high)
    return types.MappingProxyType(ranges)
