"""Output encodings: bytes on the wire and the server's encode cost, per vector.

The encode cost is the vectorised step after Matryoshka truncation and normalisation
(`akidb_embed.modeling.encodings.encode` on a whole response of rows), divided by the rows; the wire
bytes are those of a serialised `EmbeddingBatch` of 64 rows (protobuf framing included), per
row; decode is the client's one `frombuffer` per response.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb_embed.modeling.encodings import Encoding, Ranges, decode, encode
from akidb_embed.modeling.engine import finish_batch

from .wire import per_call_us  # best of 5 rounds, microseconds per call

ROWS_PER_RESPONSE = 64
_PB = {
    Encoding.FLOAT32: pb.ENCODING_FLOAT32,
    Encoding.FLOAT16: pb.ENCODING_FLOAT16,
    Encoding.INT8: pb.ENCODING_INT8,
    Encoding.UINT8: pb.ENCODING_UINT8,
    Encoding.BINARY: pb.ENCODING_BINARY,
    Encoding.UBINARY: pb.ENCODING_UBINARY,
}


@dataclass(frozen=True)
class EncodingCost:
    encoding: str
    dimensions: int
    row_bytes: int
    wire_bytes_per_vector: float  # serialised EmbeddingBatch of 64 rows / 64
    vs_float32: float  # wire bytes against float32
    encode_us_per_vector: float
    decode_us_per_vector: float


def measure_encodings(vectors: np.ndarray, rounds: int = 200) -> list[EncodingCost]:
    """Per encoding, for responses of 64 rows of `vectors` (float32, any count >= 64)."""
    rows = finish_batch(vectors[:ROWS_PER_RESPONSE], vectors.shape[1], True)
    ranges = Ranges.of(finish_batch(vectors, vectors.shape[1], True), True)
    dimensions = rows.shape[1]
    out: list[EncodingCost] = []
    float32_wire = 0.0
    for encoding in Encoding:
        encoded = encode(rows, encoding, ranges)
        batch = pb.EmbeddingBatch(
            vectors=encoded.tobytes(),
            dimensions=dimensions,
            token_counts=[64] * len(rows),
            truncated=[False] * len(rows),
            encoding=_PB[encoding],
        )
        wire = len(batch.SerializeToString()) / len(rows)
        float32_wire = float32_wire or wire
        data = encoded.tobytes()
        out.append(
            EncodingCost(
                encoding=encoding.value,
                dimensions=dimensions,
                row_bytes=encoding.row_bytes(dimensions),
                wire_bytes_per_vector=wire,
                vs_float32=wire / float32_wire,
                encode_us_per_vector=per_call_us(lambda e=encoding: encode(rows, e, ranges), rounds)
                / len(rows),
                decode_us_per_vector=per_call_us(
                    lambda e=encoding, d=data: decode(d, e, dimensions), rounds
                )
                / len(rows),
            )
        )
    return out


def summary(costs: list[dict[str, float | str]]) -> str:
    """One report line."""
    return "encodings, per vector: " + "; ".join(
        f"{c['encoding']} {c['wire_bytes_per_vector']:.0f} B ({c['vs_float32']:.0%}), encode "
        f"{c['encode_us_per_vector']:.2f} us"
        for c in costs
    )


if __name__ == "__main__":
    sample = np.random.default_rng(0).standard_normal((512, 384)).astype(np.float32)
    for cost in measure_encodings(sample):
        print(cost)
