"""Pure numpy functions: quantisation types, affine quantisation, error metrics."""
