"""Check a safetensors file without loading its tensors.

Format: 8-byte little-endian header length N, then N bytes of JSON mapping tensor names to
{dtype, shape, data_offsets: [begin, end]} (plus optional "__metadata__"), then the data
buffer, which the tensors must cover exactly (the format allows no holes and no tail).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

# A header this large is not a real model (the biggest real headers are a few MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


class SafetensorsError(ValueError):
    """The file is not a complete, well-formed safetensors file."""


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The header's length and its JSON. Raises SafetensorsError (or OSError) if unreadable."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path.name} is {len(prefix)} bytes, too short for a header")
        (length,) = struct.unpack("<Q", prefix)
        if length == 0 or length > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path.name} declares an impossible header of {length} bytes")
        raw = handle.read(length)
    if len(raw) < length:
        raise SafetensorsError(f"{path.name} ends inside its header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(f"{path.name} has a header that is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name} has a header that is not a JSON object")
    return length, header


def check_file(path: Path) -> None:
    """Raise SafetensorsError unless the header parses and the tensors cover the data exactly."""
    length, header = read_header(path)
    data_bytes = path.stat().st_size - 8 - length
    end_max = 0
    covered = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(f"{path.name}: tensor {name!r} has a malformed entry") from exc
        if not 0 <= begin <= end:
            raise SafetensorsError(f"{path.name}: tensor {name!r} has offsets {begin}..{end}")
        if dtype in DTYPE_BYTES and (end - begin) != DTYPE_BYTES[dtype] * math.prod(shape):
            raise SafetensorsError(
                f"{path.name}: tensor {name!r} ({dtype} {shape}) spans {end - begin} bytes"
            )
        end_max = max(end_max, end)
        covered += end - begin
    if end_max != data_bytes or covered != data_bytes:
        raise SafetensorsError(
            f"{path.name} holds {data_bytes} data bytes but its tensors cover {end_max} "
            "(truncated or padded file)"
        )
