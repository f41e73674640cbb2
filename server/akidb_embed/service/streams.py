"""One EmbedStream's messages on their way to the engine.

A client that sends one text per message (or a few) would otherwise cost a group, a tokenizer
call, a scheduler entry and a future per message. Here consecutive small messages with the
same model and options travel as one group while the stream already has work in flight, and
each message still gets its own result, in order. Nothing waits for a timer: a message goes
out at once when the stream has fewer than `max_in_flight` groups running, so a trickle is
answered at once and only a backlog coalesces. A large message goes out alone, as it came.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import EmbedError
from ..modeling.engine import EmbedOptions
from .service import EmbeddingService, GroupResult

# Groups of one stream running at once before small messages start to coalesce. One is the
# fastest measured (one item per message, 1-layer model: 2,900-3,150 messages/s with one,
# 2,100-2,500 with two, 2,060-2,200 with four): each extra group is one more tokenizer call
# and scheduler entry, and the engine's own batching keeps the workers busy meanwhile.
MAX_IN_FLIGHT = 1
# Texts in one coalesced group, and the size from which a message goes out alone (the
# clients' own message size, so their coalesced messages pass straight through).
MERGE_TEXTS = 256


@dataclass
class _Part:
    texts: Sequence[str]
    future: asyncio.Future[GroupResult]


class StreamGroups:
    """Turns a stream's messages into engine groups; `add` returns the message's result."""

    def __init__(
        self,
        service: EmbeddingService,
        max_in_flight: int = MAX_IN_FLIGHT,
        merge_texts: int = MERGE_TEXTS,
    ) -> None:
        self._service = service
        self._max_in_flight = max_in_flight
        self._merge_texts = merge_texts
        self._waiting: list[_Part] = []
        self._waiting_texts = 0
        self._key: tuple[str, EmbedOptions | EmbedError] | None = None
        self._running: set[asyncio.Task[GroupResult]] = set()
        self.groups = 0  # groups sent to the engine, for tests and metrics

    def add(
        self, model: str, texts: Sequence[str], options: EmbedOptions | EmbedError
    ) -> asyncio.Future[GroupResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[GroupResult] = loop.create_future()
        if not texts:
            future.set_result(GroupResult.empty())
            return future
        key = (model, options)
        if self._key is not None and (self._key[0] != model or self._key[1] is not options):
            self.flush()
        self._key = key
        if len(texts) >= self._merge_texts:
            self.flush()
            self._start([_Part(texts, future)])
            return future
        self._waiting.append(_Part(texts, future))
        self._waiting_texts += len(texts)
        if len(self._running) < self._max_in_flight or self._waiting_texts >= self._merge_texts:
            self.flush()
        return future

    def flush(self) -> None:
        """Sends what waits now (the stream ended, or the model or options change)."""
        if self._waiting:
            parts, self._waiting, self._waiting_texts = self._waiting, [], 0
            self._start(parts)

    def cancel(self) -> None:
        for part in self._waiting:
            part.future.cancel()
        self._waiting, self._waiting_texts = [], 0
        for task in list(self._running):
            task.cancel()

    def _start(self, parts: list[_Part]) -> None:
        assert self._key is not None
        model, options = self._key
        texts = parts[0].texts if len(parts) == 1 else [t for p in parts for t in p.texts]
        task = asyncio.ensure_future(self._service.embed_group(model, texts, options))
        self.groups += 1
        self._running.add(task)
        task.add_done_callback(lambda done: self._finished(done, parts))

    def _finished(self, task: asyncio.Task[GroupResult], parts: list[_Part]) -> None:
        self._running.discard(task)
        if task.cancelled():
            for part in parts:
                part.future.cancel()
        elif (error := task.exception()) is not None:
            for part in parts:
                if not part.future.done():
                    part.future.set_exception(error)
        else:
            results = task.result().split([len(p.texts) for p in parts])
            for part, result in zip(parts, results, strict=True):
                if not part.future.done():
                    part.future.set_result(result)
        if self._waiting and len(self._running) < self._max_in_flight:
            self.flush()
