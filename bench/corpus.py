"""A corpus of real text not written by us: docstrings of the Python standard library.

The passages come from `akidb_embed.modeling.corpus`, which the server also uses for calibration and
its self-check; this module adds the statistics the report prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from akidb_embed.modeling.corpus import docstrings, paragraphs, passages, sample, stdlib_files

__all__ = ["LengthStats", "docstrings", "paragraphs", "passages", "sample", "stdlib_files"]


@dataclass(frozen=True)
class LengthStats:
    count: int
    total_tokens: int
    mean: float
    p10: int
    p50: int
    p90: int
    p99: int
    max: int
    truncated: int

    @classmethod
    def of(cls, lengths: Sequence[int], limit: int) -> LengthStats:
        arr = np.asarray(lengths)
        q = np.percentile(arr, [10, 50, 90, 99]).astype(int)
        return cls(
            count=len(arr),
            total_tokens=int(arr.sum()),
            mean=float(arr.mean()),
            p10=int(q[0]),
            p50=int(q[1]),
            p90=int(q[2]),
            p99=int(q[3]),
            max=int(arr.max()),
            truncated=int((arr >= limit).sum()),
        )
