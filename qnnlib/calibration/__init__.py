"""Calibration: data sources, observers and methods, and the statistics pass."""
