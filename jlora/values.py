"""Type checks for the values users give (parameters, configs, JSON files): an integer or a
real number, never a bool, though Python counts True as 1. numpy scalars count."""

from __future__ import annotations

import numpy as np


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
