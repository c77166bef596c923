"""Checks shared by the weight readers: a loaded tensor must have the shape the config implies."""

from __future__ import annotations

import numpy as np


def check_shape(array: np.ndarray, expected: tuple, what: str) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{what} has shape {tuple(array.shape)}, but the model config "
                         f"implies {tuple(expected)}")
