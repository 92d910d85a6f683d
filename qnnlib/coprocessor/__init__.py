"""The coprocessor stand-in: integer layers in numpy integer kernels, the rest on onnxruntime.

Under the ``ort-exact`` policy every integer equals onnxruntime's (:mod:`qnnlib.coprocessor.session`).
"""

from qnnlib.coprocessor.policy import POLICIES
from qnnlib.coprocessor.session import InferenceSession, NodeArg

__all__ = ["POLICIES", "InferenceSession", "NodeArg"]
