"""Normalisation passes, one per module; :mod:`qnnlib.graph.normalize` runs them in order."""
