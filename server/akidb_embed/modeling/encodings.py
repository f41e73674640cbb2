"""Output encodings of the vectors: float32, float16, int8/uint8 with per-dimension ranges,
and sign bits, as sentence-transformers' `quantize_embeddings` defines them.

Applied to whole (N, D) arrays after Matryoshka truncation and normalisation; the servicer
sends the result's bytes as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import numpy as np

from ..errors import InvalidArgument


class Encoding(Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"
    UINT8 = "uint8"
    BINARY = "binary"
    UBINARY = "ubinary"

    @property
    def needs_ranges(self) -> bool:
        return self in (Encoding.INT8, Encoding.UINT8)

    @property
    def dtype(self) -> np.dtype[np.generic]:
        return np.dtype(_DTYPES[self])

    def row_bytes(self, dimensions: int) -> int:
        if self in (Encoding.BINARY, Encoding.UBINARY):
            return (dimensions + 7) // 8
        return dimensions * self.dtype.itemsize

    @classmethod
    def parse(cls, value: str) -> Encoding:
        try:
            return cls(value.lower())
        except ValueError:
            allowed = ", ".join(e.value for e in cls)
            raise InvalidArgument(
                f"encoding {value!r} is not known; use one of {allowed}"
            ) from None


_DTYPES = {
    Encoding.FLOAT32: "<f4",
    Encoding.FLOAT16: "<f2",
    Encoding.INT8: "i1",
    Encoding.UINT8: "u1",
    Encoding.BINARY: "i1",
    Encoding.UBINARY: "u1",
}


@dataclass(frozen=True, eq=False)
class Ranges:
    """Per-dimension (min, max) of calibration vectors, for int8/uint8."""

    minimum: np.ndarray  # float32 (D,)
    maximum: np.ndarray  # float32 (D,)
    calibration_texts: int
    dimensions: int
    normalized: bool

    @classmethod
    def of(cls, vectors: np.ndarray, normalized: bool) -> Ranges:
        """Ranges of calibration vectors (N, D), already truncated and normalised."""
        return cls(
            np.ascontiguousarray(vectors.min(axis=0), dtype=np.float32),
            np.ascontiguousarray(vectors.max(axis=0), dtype=np.float32),
            len(vectors),
            int(vectors.shape[1]),
            normalized,
        )

    @cached_property
    def id(self) -> str:
        digest = hashlib.sha256(self.minimum.astype("<f4").tobytes())
        digest.update(self.maximum.astype("<f4").tobytes())
        return digest.hexdigest()[:16]

    @cached_property
    def _starts_steps(self) -> tuple[np.ndarray, np.ndarray]:
        steps = (self.maximum - self.minimum) / 255
        return self.minimum, np.where(steps == 0, 1, steps).astype(np.float32)

    def quantize(self, vectors: np.ndarray) -> np.ndarray:
        """0..255 buckets per value, as float32 (sentence-transformers' arithmetic)."""
        starts, steps = self._starts_steps
        buckets = np.subtract(vectors, starts, dtype=np.float32)
        np.divide(buckets, steps, out=buckets)
        np.floor(buckets, out=buckets)
        return np.clip(buckets, 0, 255, out=buckets)

    def dequantize(self, codes: np.ndarray, encoding: Encoding) -> np.ndarray:
        starts, steps = self._starts_steps
        values = codes.astype(np.float64)
        if encoding is Encoding.INT8:
            values += 128
        return values * steps + starts


def encode(vectors: np.ndarray, encoding: Encoding, ranges: Ranges | None = None) -> np.ndarray:
    """Rows (N, D) float32 -> the encoded rows (N, row_bytes / itemsize), C-contiguous."""
    if encoding is Encoding.FLOAT32:
        return np.ascontiguousarray(vectors, dtype="<f4")
    if encoding is Encoding.FLOAT16:
        return vectors.astype("<f2")
    if encoding is Encoding.BINARY or encoding is Encoding.UBINARY:
        bits = np.packbits(vectors > 0, axis=-1)
        if encoding is Encoding.BINARY:
            np.bitwise_xor(bits, 0x80, out=bits)  # the byte minus 128, as a signed byte
            return bits.view(np.int8)
        return bits
    if ranges is None or ranges.dimensions != vectors.shape[1]:
        raise InvalidArgument(
            f"encoding {encoding.value} needs quantisation ranges for {vectors.shape[1]} "
            "dimensions, which this model has none of"
        )
    buckets = ranges.quantize(vectors)
    if encoding is Encoding.UINT8:
        return buckets.astype(np.uint8)
    buckets -= 128
    return buckets.astype(np.int8)


def decode(data: bytes, encoding: Encoding, dimensions: int) -> np.ndarray:
    """The rows of a buffer as the encoding's numpy dtype: (N, D) values, (N, ceil(D/8))
    bytes for the bit encodings."""
    width = encoding.row_bytes(dimensions) // encoding.dtype.itemsize if dimensions else 0
    flat = np.frombuffer(data, dtype=encoding.dtype)
    return flat.reshape(-1, width) if width else flat.reshape(0, 0)
