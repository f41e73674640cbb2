"""StreamGroups: a stream's small messages travel as one group while the stream has work in
flight, and every message still gets exactly its own results; GroupResult.split."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from akidb_embed.errors import EmbedError, InvalidArgument
from akidb_embed.modeling.chunking import Chunks
from akidb_embed.modeling.engine import EmbedOptions
from akidb_embed.service.service import GroupResult
from akidb_embed.service.streams import StreamGroups


def vector_of(text: str) -> list[float]:
    return [float(len(text)), float(sum(map(ord, text)) % 997)]


def result_of(texts: Sequence[str]) -> GroupResult:
    """What the service would answer: one row per non-empty text, an error per empty one."""
    errors: list[tuple[int, EmbedError]] = [
        (i, InvalidArgument("text is empty")) for i, t in enumerate(texts) if not t
    ]
    good = [t for t in texts if t]
    vectors = np.array([vector_of(t) for t in good], dtype=np.float32).reshape(len(good), 2)
    return GroupResult(
        size=len(texts),
        space=None,
        vectors=vectors,
        token_counts=[len(t) for t in good],
        truncated=[False] * len(good),
        errors=errors,
    )


class FakeService:
    """embed_group held open until `release()`: the test decides what is in flight."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], object]] = []
        self.gates: list[asyncio.Event] = []

    async def embed_group(
        self, model: str, texts: Sequence[str], options: EmbedOptions | EmbedError
    ) -> GroupResult:
        self.calls.append((model, list(texts), options))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return result_of(texts)

    def release(self) -> None:
        for gate in self.gates:
            gate.set()


def groups_for(service: FakeService, **kwargs: int) -> StreamGroups:
    return StreamGroups(service, **kwargs)  # type: ignore[arg-type]


def check(result: GroupResult, texts: Sequence[str]) -> None:
    expected = result_of(texts)
    assert result.size == expected.size
    np.testing.assert_array_equal(result.vectors, expected.vectors)
    assert result.token_counts == expected.token_counts
    # Indexed within the message (the error's text was written for the whole group).
    assert [i for i, _ in result.errors] == [i for i, _ in expected.errors]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_backlog_of_small_messages_goes_as_one_group() -> None:
    service = FakeService()
    groups = groups_for(service, max_in_flight=1)
    options = EmbedOptions()
    messages = [["first"], ["a", ""], [""], ["b"], ["c", "dd", "eee"]]
    futures = [groups.add("m", texts, options) for texts in messages]
    await settle()
    # The first went out at once; the rest waited for it.
    assert [texts for _, texts, _ in service.calls] == [["first"]]
    service.release()
    await settle()
    assert [texts for _, texts, _ in service.calls] == [
        ["first"],
        ["a", "", "", "b", "c", "dd", "eee"],
    ]
    service.release()
    results = await asyncio.gather(*futures)
    for texts, result in zip(messages, results, strict=True):
        check(result, texts)
    assert groups.groups == 2


async def test_a_trickle_is_not_held_back() -> None:
    service = FakeService()
    groups = groups_for(service, max_in_flight=1)
    for i in range(3):
        future = groups.add("m", [f"text {i}"], EmbedOptions())
        await settle()
        assert len(service.calls) == i + 1  # sent at once: nothing was in flight
        service.release()
        check(await future, [f"text {i}"])


async def test_large_messages_and_a_full_backlog_go_out_without_waiting() -> None:
    service = FakeService()
    groups = groups_for(service, max_in_flight=1, merge_texts=4)
    options = EmbedOptions()
    first = groups.add("m", ["x"], options)
    small = [groups.add("m", ["s1"], options), groups.add("m", ["s2"], options)]
    large = groups.add("m", ["l1", "l2", "l3", "l4"], options)  # flushes the two first
    await settle()
    assert [texts for _, texts, _ in service.calls] == [
        ["x"],
        ["s1", "s2"],
        ["l1", "l2", "l3", "l4"],
    ]
    backlog = [groups.add("m", [f"b{i}"], options) for i in range(5)]
    await settle()
    assert service.calls[3][1] == ["b0", "b1", "b2", "b3"]  # 4 texts waiting: sent
    service.release()
    await settle()
    assert service.calls[4][1] == ["b4"]
    service.release()
    check(await first, ["x"])
    check(await large, ["l1", "l2", "l3", "l4"])
    for i, future in enumerate(small):
        check(await future, [f"s{i + 1}"])
    for i, future in enumerate(backlog):
        check(await future, [f"b{i}"])


async def test_a_new_model_or_options_starts_a_new_group() -> None:
    service = FakeService()
    groups = groups_for(service, max_in_flight=1)
    plain, raw = EmbedOptions(), EmbedOptions(normalize=False)
    bad = InvalidArgument("dimensions 7 is not one of 384")
    futures = [
        groups.add("m", ["a"], plain),
        groups.add("m", ["b"], plain),
        groups.add("m", ["c"], raw),
        groups.add("other", ["d"], raw),
        groups.add("other", ["e"], bad),
        groups.add("other", ["f"], bad),
    ]
    groups.flush()
    await settle()
    assert [(m, texts, o) for m, texts, o in service.calls] == [
        ("m", ["a"], plain),
        ("m", ["b"], plain),
        ("m", ["c"], raw),
        ("other", ["d"], raw),
        ("other", ["e", "f"], bad),
    ]
    service.release()
    for texts, future in zip("abcdef", futures, strict=True):
        check(await future, [texts])


async def test_empty_messages_answer_at_once_and_cancel_reaches_every_message() -> None:
    service = FakeService()
    groups = groups_for(service, max_in_flight=1)
    running = groups.add("m", ["a"], EmbedOptions())
    empty = groups.add("m", [], EmbedOptions())
    waiting = groups.add("m", ["b"], EmbedOptions())
    await settle()
    assert empty.done() and empty.result().size == 0
    groups.cancel()
    await settle()
    assert running.cancelled() and waiting.cancelled()
    assert len(service.calls) == 1


async def test_a_failing_group_fails_each_of_its_messages() -> None:
    class Broken(FakeService):
        async def embed_group(
            self, model: str, texts: Sequence[str], options: EmbedOptions | EmbedError
        ) -> GroupResult:
            await asyncio.sleep(0)
            raise RuntimeError("engine gone")

    groups = groups_for(Broken(), max_in_flight=1)
    futures = [groups.add("m", [t], EmbedOptions()) for t in "abc"]
    for future in futures:
        with pytest.raises(RuntimeError, match="engine gone"):
            await future


def test_split_hands_each_part_its_rows_and_errors() -> None:
    texts = ["a", "", "bb", "ccc", "", "", "dddd", "e"]
    whole = result_of(texts)
    sizes = [1, 2, 3, 0, 2]
    parts = whole.split(sizes)
    start = 0
    for size, part in zip(sizes, parts, strict=True):
        check(part, texts[start : start + size])
        start += size
    with pytest.raises(ValueError, match="parts of 7 texts"):
        whole.split([3, 4])


def test_split_with_chunk_windows() -> None:
    # 4 texts, the second failed; the others have 2, 1 and 3 windows.
    counts = np.array([2, 1, 3], dtype=np.int64)
    rows = int(counts.sum())
    chunks = Chunks(
        counts=counts,
        index=np.array([0, 1, 0, 0, 1, 2], dtype=np.uint32),
        char_start=np.arange(rows, dtype=np.int64),
        char_end=np.arange(rows, dtype=np.int64) + 10,
        byte_start=np.arange(rows, dtype=np.int64),
        byte_end=np.arange(rows, dtype=np.int64) + 10,
    )
    whole = GroupResult(
        size=4,
        space=None,
        vectors=np.arange(rows * 2, dtype=np.float32).reshape(rows, 2),
        token_counts=list(range(rows)),
        truncated=[False] * rows,
        errors=[(1, InvalidArgument("empty"))],
        chunks=chunks,
    )
    first, second = whole.split([2, 2])
    assert first.chunks is not None and second.chunks is not None
    assert first.chunks.counts.tolist() == [2] and first.token_counts == [0, 1]
    assert [i for i, _ in first.errors] == [1]
    assert second.chunks.counts.tolist() == [1, 3]
    assert second.chunks.index.tolist() == [0, 0, 1, 2]
    assert second.chunks.char_start.tolist() == [2, 3, 4, 5]
    np.testing.assert_array_equal(second.vectors, whole.vectors[2:])
    assert not second.errors
