"""Optimisation under the user's threshold: activation ranges, weight clipping, precision raising."""
