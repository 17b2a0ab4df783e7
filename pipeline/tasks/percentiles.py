"""The spread of a length (characters, words, tokens, windows) that the data reports show."""

from __future__ import annotations

from typing import Any

import numpy as np


def percentiles(values: Any) -> dict[str, float]:
    """The 50th, 90th, 95th, 99th and 100th percentiles of `values` ({} when empty)."""
    arr = np.asarray(values, dtype=float)
    return (
        {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 95, 99, 100)} if len(arr) else {}
    )
