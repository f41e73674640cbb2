"""Wire cost of a vector: packed little-endian bytes (the contract) vs `repeated float`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _message_classes() -> tuple[type, type]:
    """Two proto3 messages built at run time: `bytes v = 1` and `repeated float v = 1`
    (packed, as proto3 encodes it)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="bench_wire.proto", package="bench.wire", syntax="proto3"
    )
    for name, kind, label in (
        ("Packed", descriptor_pb2.FieldDescriptorProto.TYPE_BYTES, 1),
        ("Repeated", descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT, 3),
    ):
        message = file.message_type.add(name=name)
        message.field.add(name="v", number=1, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    packed = message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.wire.Packed"))
    repeated = message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.wire.Repeated"))
    return packed, repeated


@dataclass(frozen=True)
class WireCost:
    dimensions: int
    packed_encode_us: float
    repeated_encode_us: float
    packed_decode_us: float
    repeated_decode_us: float
    packed_bytes: int
    repeated_bytes: int


def per_call_us(call: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            call()
        best = min(best, time.perf_counter() - started)
    return best / rounds * 1e6


def measure_wire(dimensions: int, rounds: int = 2000) -> WireCost:
    """Vector -> message -> bytes, and back to a float32 array, per vector."""
    packed_cls, repeated_cls = _message_classes()
    vector = np.random.default_rng(0).standard_normal(dimensions).astype(np.float32)
    packed_wire = packed_cls(v=vector.astype("<f4").tobytes()).SerializeToString()
    repeated_wire = repeated_cls(v=vector.tolist()).SerializeToString()

    def packed_decode() -> np.ndarray:
        message = packed_cls()
        message.ParseFromString(packed_wire)
        return np.frombuffer(message.v, dtype="<f4")

    def repeated_decode() -> np.ndarray:
        message = repeated_cls()
        message.ParseFromString(repeated_wire)
        return np.asarray(message.v, dtype=np.float32)

    return WireCost(
        dimensions=dimensions,
        packed_encode_us=per_call_us(
            lambda: packed_cls(v=vector.astype("<f4").tobytes()).SerializeToString(), rounds
        ),
        repeated_encode_us=per_call_us(
            lambda: repeated_cls(v=vector.tolist()).SerializeToString(), rounds
        ),
        packed_decode_us=per_call_us(packed_decode, rounds),
        repeated_decode_us=per_call_us(repeated_decode, rounds),
        packed_bytes=len(packed_wire),
        repeated_bytes=len(repeated_wire),
    )
