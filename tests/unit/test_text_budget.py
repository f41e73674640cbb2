"""The in-flight text budget: Embed is refused past it, stream messages wait for room."""

from __future__ import annotations

import asyncio

import pytest

from akidb_embed.errors import ErrorKind, Overloaded
from akidb_embed.modeling.engine import EmbedOptions
from akidb_embed.runtime.batching import Scheduler
from akidb_embed.service.service import EmbeddingService, Limits
from akidb_embed.store.registry import Registry


async def test_embed_is_refused_and_streams_wait_past_the_budget() -> None:
    service = EmbeddingService(Registry(), Scheduler(), Limits(max_chars_in_flight=100))
    async with service._holding_text(80, wait=False):
        with pytest.raises(Overloaded) as info:
            async with service._holding_text(30, wait=False):
                pass
        assert info.value.kind is ErrorKind.RESOURCE_EXHAUSTED
        assert "80 characters" in info.value.message and "limit 100" in info.value.message
        entered = asyncio.Event()

        async def stream_message() -> None:
            async with service._holding_text(30, wait=True):
                entered.set()

        waiting = asyncio.create_task(stream_message())
        await asyncio.sleep(0.05)
        assert not entered.is_set()  # no room yet
    await asyncio.wait_for(waiting, 5)  # room once the first is done
    assert entered.is_set()
    # A group larger than the whole budget still runs, alone.
    async with service._holding_text(1000, wait=True):
        assert service._chars_in_flight == 100
    assert service._chars_in_flight == 0


async def test_one_request_over_the_characters_limit_is_refused() -> None:
    service = EmbeddingService(Registry(), Scheduler(), Limits(max_chars_per_request=50))
    with pytest.raises(Overloaded, match="60 characters; the limit is 50"):
        await service.embed("", ["x" * 30, "y" * 30], EmbedOptions())
