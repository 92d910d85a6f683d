"""Integer types that quantised tensors are stored in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto


@dataclass(frozen=True)
class QType:
    """An integer storage type: its name, numpy dtype, ONNX element type and range."""

    name: str
    np_dtype: type[np.integer]
    onnx_type: int
    qmin: int
    qmax: int

    @property
    def signed(self) -> bool:
        """Whether the type holds negative values."""
        return self.qmin < 0

    @property
    def levels(self) -> int:
        """Number of representable values, ``qmax - qmin + 1``."""
        return self.qmax - self.qmin + 1

    @property
    def bits(self) -> int:
        """Bit width, ``log2(levels)``."""
        return self.levels.bit_length() - 1


UINT4 = QType("uint4", np.uint8, TensorProto.UINT4, 0, 15)
INT4 = QType("int4", np.int8, TensorProto.INT4, -8, 7)
UINT8 = QType("uint8", np.uint8, TensorProto.UINT8, 0, 255)
INT8 = QType("int8", np.int8, TensorProto.INT8, -128, 127)
UINT16 = QType("uint16", np.uint16, TensorProto.UINT16, 0, 65535)
INT16 = QType("int16", np.int16, TensorProto.INT16, -32768, 32767)
INT32 = QType("int32", np.int32, TensorProto.INT32, -(2**31), 2**31 - 1)

QTYPES: dict[str, QType] = {t.name: t for t in (UINT4, INT4, UINT8, INT8, UINT16, INT16, INT32)}

#: The precision of a tied group kept in float: no Q/DQ is written for it.
FLOAT = "float"

#: The 16-bit activation type that goes with each 8-bit one when a group's precision is raised.
WIDER = {"uint8": "uint16", "int8": "int16"}


def precision_name(qtype_name: str) -> str:
    """How a report names a storage type: ``int8`` for 8-bit, ``int16`` for 16-bit, or ``float``."""
    if qtype_name == FLOAT:
        return FLOAT
    return f"int{QTYPES[qtype_name].bits}"

ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("int8",)


def qtype(name: str) -> QType:
    """Look up a QType by name; raise KeyError listing the known names otherwise."""
    try:
        return QTYPES[name]
    except KeyError:
        raise KeyError(f"unknown quantisation type {name!r}; known: {sorted(QTYPES)}") from None
