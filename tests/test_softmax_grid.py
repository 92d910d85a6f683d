"""The Softmax output grid: steps per unit within QLinearSoftmax's overflow limit, exact in float32."""

from __future__ import annotations

import numpy as np
import pytest

from qnnlib.planner import SOFTMAX_STEPS_PER_ROW_VALUE, reciprocal_scale, softmax_steps


@pytest.mark.parametrize(("hi", "row", "want"), [
    (1.0, 1000, 256),  # outputs reach 1: onnxruntime's quantiser's grid
    (0.5, 1000, 510),  # floor(255 / 0.5)
    (0.01, 1000, 25500),
    (0.01, 100, 100 * SOFTMAX_STEPS_PER_ROW_VALUE),  # capped below the kernel's overflow
    (0.01, 2, 256),  # short rows: the cap is below 256, never coarser than 1/256
    (0.01, 0, 256),  # row length unknown
    (0.0, 1000, 256),  # nothing observed
])
def test_softmax_steps(hi: float, row: int, want: int) -> None:
    assert softmax_steps(hi, row, 255, power_of_two=False) == want


def test_softmax_steps_power_of_two_rounds_down() -> None:
    assert softmax_steps(0.01, 1000, 255, power_of_two=True) == 16384
    assert softmax_steps(1.0, 1000, 255, power_of_two=True) == 256


@pytest.mark.parametrize("steps", [256, 510, 999, 1000, 3000, 25500, 65536])
def test_reciprocal_scale_gives_the_kernels_step_count(steps: int) -> None:
    """QLinearSoftmax multiplies by floor(1 / s) in float32; that must be ``steps`` exactly."""
    scale = reciprocal_scale(steps)
    assert scale.dtype == np.float32
    assert np.floor(np.float32(1.0) / scale) == steps
    assert abs(float(scale) * steps - 1.0) < 1e-6
