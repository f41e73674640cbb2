"""Which models stay in memory: a budget (count and bytes), LRU eviction of idle models, and
an idle keep-alive for models loaded on demand. Preloaded models are pinned."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..modeling.engine import EmbeddingEngine


@dataclass(frozen=True)
class ModelBudget:
    max_models: int = 0  # 0: no limit
    max_bytes: int = 0  # 0: no limit
    # A model loaded on demand and idle this long is unloaded (like Ollama's keep_alive).
    # 0: never.
    keep_alive_seconds: float = 300.0


@dataclass
class Resident:
    engine: EmbeddingEngine
    pinned: bool
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def idle(self) -> bool:
        return self.in_flight == 0


class ResidentModels:
    def __init__(self, budget: ModelBudget) -> None:
        self.budget = budget
        self._models: dict[str, Resident] = {}
        # Models being loaded, by the bytes they will take: they count against the budget
        # from the moment their room is made, so two loads at once cannot both fit.
        self._reserved: dict[str, int] = {}

    def reserve(self, name: str, size_bytes: int) -> None:
        self._reserved[name] = size_bytes

    def release(self, name: str) -> None:
        self._reserved.pop(name, None)

    def get(self, name: str) -> EmbeddingEngine | None:
        resident = self._models.get(name)
        return resident.engine if resident else None

    def engines(self) -> list[EmbeddingEngine]:
        return [r.engine for r in self._models.values()]

    def add(self, engine: EmbeddingEngine, pinned: bool) -> None:
        self._reserved.pop(engine.name, None)
        self._models[engine.name] = Resident(engine, pinned)

    def pin(self, name: str) -> None:
        self._models[name].pinned = True

    def remove(self, name: str) -> EmbeddingEngine:
        return self._models.pop(name).engine

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        resident = self._models[name]
        resident.in_flight += 1
        resident.last_used = time.monotonic()
        try:
            yield
        finally:
            resident.in_flight -= 1
            resident.last_used = time.monotonic()

    def _over(self, extra_models: int, extra_bytes: int) -> bool:
        count = len(self._models) + len(self._reserved) + extra_models
        size = (
            sum(r.engine.memory_bytes for r in self._models.values())
            + sum(self._reserved.values())
            + extra_bytes
        )
        return bool(
            (self.budget.max_models and count > self.budget.max_models)
            or (self.budget.max_bytes and size > self.budget.max_bytes)
        )

    def evictions_for(self, incoming_bytes: int) -> list[str] | None:
        """Least recently used idle, unpinned models to unload so one more fits; None if
        evicting every candidate still would not make room."""
        candidates = sorted(
            (r for r in self._models.values() if r.idle and not r.pinned),
            key=lambda r: r.last_used,
        )
        chosen: list[str] = []
        freed_models, freed_bytes = 0, 0
        while self._over(1 - freed_models, incoming_bytes - freed_bytes):
            if not candidates:
                return None
            victim = candidates.pop(0)
            chosen.append(victim.engine.name)
            freed_models += 1
            freed_bytes += victim.engine.memory_bytes
        return chosen

    def expired(self, now: float | None = None) -> list[str]:
        """Idle, unpinned models past the keep-alive."""
        if not self.budget.keep_alive_seconds:
            return []
        now = time.monotonic() if now is None else now
        return [
            name
            for name, r in self._models.items()
            if r.idle and not r.pinned and now - r.last_used > self.budget.keep_alive_seconds
        ]
