"""The model budget: LRU eviction of idle, unpinned models; keep-alive expiry."""

from __future__ import annotations

from dataclasses import dataclass

from akidb_embed.service.residency import ModelBudget, ResidentModels


@dataclass
class FakeEngine:
    name: str
    memory_bytes: int


def resident(budget: ModelBudget, *specs: tuple[str, int, bool]) -> ResidentModels:
    models = ResidentModels(budget)
    for name, size, pinned in specs:
        models.add(FakeEngine(name, size), pinned=pinned)  # type: ignore[arg-type]
    return models


def test_no_budget_never_evicts() -> None:
    models = resident(ModelBudget(), ("a", 10, False), ("b", 10, False))
    assert models.evictions_for(10**12) == []


def test_count_budget_evicts_least_recently_used_idle_model() -> None:
    models = resident(ModelBudget(max_models=2), ("a", 1, False), ("b", 1, False))
    with models.use("a"):
        pass  # a is now more recent than b
    assert models.evictions_for(1) == ["b"]


def test_busy_and_pinned_models_are_never_evicted() -> None:
    models = resident(ModelBudget(max_models=2), ("pinned", 1, True), ("busy", 1, False))
    with models.use("busy"):
        assert models.evictions_for(1) is None
    assert models.evictions_for(1) == ["busy"]


def test_byte_budget_evicts_until_the_new_model_fits() -> None:
    models = resident(
        ModelBudget(max_bytes=100), ("a", 40, False), ("b", 40, False), ("c", 10, False)
    )
    assert models.evictions_for(60) == ["a", "b"]
    assert models.evictions_for(200) is None  # cannot fit even alone


def test_keep_alive_expires_idle_unpinned_models_only() -> None:
    models = resident(ModelBudget(keep_alive_seconds=5), ("a", 1, False), ("p", 1, True))
    assert models.expired() == []
    assert models.expired(now=10**9) == ["a"]
    assert resident(ModelBudget(keep_alive_seconds=0), ("a", 1, False)).expired(10**9) == []
