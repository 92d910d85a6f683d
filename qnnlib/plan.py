"""The quantisation plan: which tensor gets which parameters, which layer which precision.

A plain, serialisable value. Everything before emission decides the plan; the emitter only writes
it. ``QuantPlan.to_json()`` and ``QuantPlan.from_json()`` round-trip exactly, so a plan can be
diffed and kept as a golden file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: ``ActivationParams.source`` of a group holding a Softmax output: fixed, kept by the range search.
SOFTMAX_SOURCE = "softmax"


@dataclass(frozen=True)
class ActivationParams:
    """Per-tensor parameters of a tied group: ``r = scale * (q - zero_point)`` in ``qtype``.

    ``range`` is the real interval they were derived from; ``source`` says how it was chosen.
    """

    qtype: str
    scale: float
    zero_point: int
    range: tuple[float, float]
    source: str = "calibrated"


@dataclass(frozen=True)
class GroupPlan:
    """A tied group: its members (graph order), the nodes that tied them, and the shared parameters."""

    id: int
    members: tuple[str, ...]
    tied_by: tuple[str, ...]
    params: ActivationParams


@dataclass(frozen=True)
class WeightPlan:
    """A constant input of a layer quantised as a weight (symmetric, per channel) or an int32 bias.

    ``scales`` has one entry per channel along ``axis`` (one entry when ``axis`` is None);
    ``qmax`` bounds the quantised magnitude (127, or 63 with the overflow fix; unused for biases);
    ``clamped`` counts bias values that overflowed int32 and were clamped; ``correction`` (biases
    only, one value per channel, or empty) is added to the float bias before it is quantised: the
    mean output shift the layer's quantised weights cause (bias correction).
    """

    node: str
    input_index: int
    tensor: str
    kind: str
    qtype: str
    axis: int | None
    scales: tuple[float, ...]
    clamped: int = 0
    qmax: int = 127
    correction: tuple[float, ...] = ()

    def corrected(self, value: np.ndarray) -> np.ndarray:
        """The float value this plan quantises: the model's ``value`` plus the correction, float32."""
        value = np.asarray(value, np.float32)
        if not self.correction:
            return value
        return (value.reshape(-1) + np.asarray(self.correction, np.float32)).reshape(value.shape)


@dataclass(frozen=True)
class LayerPlan:
    """A node and the precision it runs at (``"int8"`` for 8-bit integer kernels, or ``"float"``)."""

    node: str
    op_type: str
    precision: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class QuantPlan:
    """Everything the emitter needs, and nothing it has to decide."""

    activation_type: str
    weight_type: str
    groups: tuple[GroupPlan, ...]
    weights: tuple[WeightPlan, ...]
    layers: tuple[LayerPlan, ...]
    dropped_activations: tuple[str, ...] = ()
    _group_of: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_group_of", {m: g.id for g in self.groups for m in g.members})

    def group_of(self, tensor: str) -> GroupPlan | None:
        """The tied group holding ``tensor``, or None if it is not quantised."""
        gid = self._group_of.get(tensor)
        return None if gid is None else self.groups[gid]

    def params(self, tensor: str) -> ActivationParams:
        """The parameters of a quantised activation tensor; KeyError if it is not one."""
        group = self.group_of(tensor)
        if group is None:
            raise KeyError(f"tensor {tensor!r} is not quantised in this plan")
        return group.params

    def is_quantized(self, tensor: str) -> bool:
        """Whether ``tensor`` is a quantised activation."""
        return tensor in self._group_of

    def weights_of(self, node: str) -> tuple[WeightPlan, ...]:
        """The weight and bias plans of ``node``."""
        return tuple(w for w in self.weights if w.node == node)

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data.pop("_group_of", None)
        return data

    def to_json(self, **kwargs: Any) -> str:
        """The plan as a JSON string (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        """Rebuild a plan written by :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        """Rebuild a plan from :meth:`to_dict` output."""
        groups = tuple(
            GroupPlan(g["id"], tuple(g["members"]), tuple(g["tied_by"]),
                      ActivationParams(**{**g["params"], "range": tuple(g["params"]["range"])}))
            for g in data["groups"]
        )
        weights = tuple(WeightPlan(**{**w, "scales": tuple(w["scales"]), "correction": tuple(w.get("correction", ()))})
                        for w in data["weights"])
        layers = tuple(
            LayerPlan(x["node"], x["op_type"], x["precision"], tuple(x["inputs"]), tuple(x["outputs"]))
            for x in data["layers"]
        )
        return cls(data["activation_type"], data["weight_type"], groups, weights, layers,
                   tuple(data.get("dropped_activations", ())))
