"""Emitters: they write a plan as an ONNX model; they decide nothing."""
