"""The graph layer: loading, normalising and walking ONNX models; tied groups."""
