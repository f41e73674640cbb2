"""The domain service on its own (no gRPC), computing in this process (no engine workers):
request budgets (texts per request, characters per text, characters in flight, queued
tokens), token-id input, draining (`accepting`), per-item errors of stream messages, models
refused for non-finite vectors, compute failures, and the model lifecycle: on-demand loads,
failed loads, unloads, the model budget and int8 calibration.

Most tests serve a small engine whose network is a fixed numpy table (so every expected
vector is computed here from the table, independently of the service); the lifecycle tests
load a tiny random Qwen3 checkpoint (tests/fixtures/tiny_models.py) from an operator
directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from akidb_embed.errors import (
    EmbedError,
    ErrorKind,
    InvalidArgument,
    ModelLoadError,
    ModelNotAvailable,
    ModelNotFound,
    Overloaded,
    Unavailable,
)
from akidb_embed.modeling import loader
from akidb_embed.modeling.encodings import Encoding
from akidb_embed.modeling.engine import EmbeddingEngine, EmbedOptions, ModelProfile, PromptKind
from akidb_embed.modeling.models.base import Pooling
from akidb_embed.modeling.tokenization import TextTokenizer, Truncation
from akidb_embed.runtime.batching import Scheduler
from akidb_embed.service import service as service_module
from akidb_embed.service.residency import ModelBudget
from akidb_embed.service.service import EmbeddingService, Limits, ModelState
from akidb_embed.store.model_cache import Manifest, ManifestFile, RepoCache
from akidb_embed.store.registry import Registry
from tests.fixtures import tiny_models as tiny

FAKE = "fake"
HIDDEN = 16
MAX_TOKENS = 8
NAN_WORD = "apple"  # its row of the table is NaN
FAIL_WORD = "rust"  # a batch holding it fails in the network
FAIL_MESSAGE = "the network hit a bad row"
QWEN = "tiny-qwen"


class TableNetwork:
    """Mean of fixed per-token rows: a network whose output the tests can compute."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        rng = np.random.default_rng(7)
        self.table = rng.standard_normal((len(vocab), HIDDEN)).astype(np.float32)
        self.table[vocab[NAN_WORD]] = np.nan
        self.fail_id = vocab[FAIL_WORD]

    def pooled(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self.table[ids].mean(axis=0), dtype=np.float32)

    def __call__(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if (ids == self.fail_id).any():
            raise RuntimeError(FAIL_MESSAGE)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        rows = [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(lengths))]
        return np.stack([self.pooled(row) for row in rows])


@pytest.fixture(scope="module")
def network() -> TableNetwork:
    return TableNetwork(tiny.word_tokenizer(["[PAD]", "[UNK]"], "[UNK]", None))


@pytest.fixture(scope="module")
def fake(network: TableNetwork) -> EmbeddingEngine:
    raw = tiny.word_tokenizer(["[PAD]", "[UNK]"], "[UNK]", None)
    profile = ModelProfile(
        architecture="table",
        dimensions=HIDDEN,
        max_tokens=MAX_TOKENS,
        pooling=Pooling.MEAN,
        normalize=True,
        dtype="float32",
        prompts={"query": "query :"},
    )
    return EmbeddingEngine(
        name=FAKE,
        source="acme/table-model",
        revision="r1",
        profile=profile,
        tokenizer=TextTokenizer(raw, MAX_TOKENS),
        compute=network,
        memory_bytes=1000,
    )


@pytest.fixture(scope="module")
def worker() -> Iterator[Scheduler]:
    compute = Scheduler()
    compute.start()
    yield compute
    compute.stop(timeout=30)


@pytest.fixture(scope="module")
def qwen_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_qwen3(tmp_path_factory.mktemp("qwen") / "qwen3")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The model cache and the derived records (self-check, calibration) of this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("AKIDB_CACHE_DIR", str(root))
    return root


@pytest.fixture
def registry(tmp_path: Path, cache: Path) -> Registry:
    stub = tmp_path / "table-model"
    stub.mkdir()
    (stub / "config.json").write_text("{}")
    registry = Registry(default_model=FAKE, cache_root=cache)
    registry.add_local(stub, name=FAKE)
    return registry


Notes = list[tuple[str, bool]]


@pytest.fixture
def notes() -> Notes:
    return []


MakeService = Callable[..., EmbeddingService]


@pytest.fixture
def make_service(
    registry: Registry, worker: Scheduler, fake: EmbeddingEngine, notes: Notes
) -> MakeService:
    """A service with the table model warm and pinned (preloaded), as the server makes it."""

    def make(limits: Limits | None = None, budget: ModelBudget | None = None) -> EmbeddingService:
        service = EmbeddingService(registry, worker, limits, budget)
        service.residents.add(fake, pinned=True)

        async def changed(name: str, serving: bool) -> None:
            notes.append((name, serving))

        service.on_model_change = changed
        return service

    return make


def add_qwen(registry: Registry, source: Path, root: Path, name: str = QWEN) -> Path:
    directory = Path(shutil.copytree(source, root / name))
    registry.add_local(directory, name=name)
    return directory


@contextlib.contextmanager
def compute_held(worker: Scheduler) -> Iterator[None]:
    """The compute thread busy until the block ends: work queues up behind it."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    done = worker.call(hold)
    assert started.wait(10)
    try:
        yield
    finally:
        release.set()
        done.result(10)


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def expected(fake: EmbeddingEngine, network: TableNetwork, texts: list[str]) -> np.ndarray:
    rows = [network.pooled(t.ids) for t in fake.tokenize(texts, EmbedOptions())]
    vectors = np.stack(rows)
    return np.asarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), np.float32)


def status_of(service: EmbeddingService, name: str) -> tuple[ModelState, str]:
    found = [s for s in service.statuses() if s.entry.name == name]
    assert len(found) == 1, f"{name!r} is listed {len(found)} times"
    return found[0].state, found[0].reason


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories the service loads engines from, from now on, in order."""
    loads: list[Path] = []
    real = loader.load_engine

    def counting(directory: Path, **kwargs: Any) -> EmbeddingEngine:
        loads.append(directory)
        return real(directory, **kwargs)

    monkeypatch.setattr(service_module, "load_engine", counting)
    return loads


# --- requests ------------------------------------------------------------------------------


async def test_embed_returns_the_networks_vectors_in_input_order(
    make_service: MakeService, fake: EmbeddingEngine, network: TableNetwork
) -> None:
    service = make_service()
    texts = ["the cat", "a dog and a river", "the"]
    result = await service.embed("", texts, EmbedOptions())
    assert result.model == FAKE
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (3, HIDDEN)
    np.testing.assert_allclose(result.vectors, expected(fake, network, texts), rtol=1e-6)
    assert result.token_counts == [2, 5, 1] and result.total_tokens == 8
    assert result.truncated == [False, False, False]
    assert (result.space.model_id, result.space.revision) == ("acme/table-model", "r1")
    raw = await service.embed(FAKE, texts, EmbedOptions(normalize=False))
    pooled = [network.pooled(t.ids) for t in fake.tokenize(texts, EmbedOptions())]
    np.testing.assert_allclose(raw.vectors, np.stack(pooled), rtol=1e-6)


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "texts is empty: send at least one text"),
        (["a", "b", "c", "d"], "4 texts in one request; the limit is 3: split the batch or use"),
        (["the cat", ""], "texts[1] is empty: send at least one character"),
        (["ok", "x" * 41], "texts[1] has 41 characters; the limit is 40: split it"),
    ],
)
async def test_bad_texts_are_refused_before_the_model_is_looked_up(
    make_service: MakeService, texts: list[str], message: str
) -> None:
    service = make_service(Limits(max_texts_per_request=3, max_chars_per_text=40))
    with pytest.raises(InvalidArgument) as info:
        await service.embed("no-such-model", texts, EmbedOptions())
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT
    assert message in info.value.message
    with pytest.raises(ModelNotFound):  # the same model with good texts
        await service.embed("no-such-model", ["fine"], EmbedOptions())


async def test_texts_over_the_token_limit_follow_the_truncation_policy(
    make_service: MakeService, fake: EmbeddingEngine, network: TableNetwork
) -> None:
    service = make_service()
    long = "the a cat a dog a river a city"  # 9 tokens; the window is 8
    with pytest.raises(InvalidArgument) as info:
        await service.embed("", ["the cat", long], EmbedOptions(truncation=Truncation.ERROR))
    assert "texts[1] has more than 8 tokens but the model accepts at most 8" in info.value.message
    found = [fake.tokenizer.token_id(word) for word in long.split()]
    ids = [i for i in found if i is not None]
    assert len(ids) == 9  # every word is in the vocabulary
    for policy, kept in ((Truncation.END, ids[:8]), (Truncation.START, ids[-8:])):
        result = await service.embed("", ["the cat", long], EmbedOptions(truncation=policy))
        assert result.token_counts == [2, 8] and result.truncated == [False, True]
        row = network.pooled(kept)
        np.testing.assert_allclose(result.vectors[1], row / np.linalg.norm(row), rtol=1e-6)


async def test_in_flight_text_budget_refuses_unary_calls_while_streams_wait(
    make_service: MakeService, worker: Scheduler, fake: EmbeddingEngine
) -> None:
    service = make_service(Limits(max_chars_in_flight=100))
    thirty = "the cat " * 3 + "the a "  # 30 characters
    assert len(thirty) == 30
    with compute_held(worker):
        first = asyncio.ensure_future(service.embed("", ["the cat " * 10], EmbedOptions()))
        await until(lambda: worker.queued_items > 0)
        with pytest.raises(Overloaded) as info:
            await service.embed("", [thirty], EmbedOptions())
        assert info.value.kind is ErrorKind.RESOURCE_EXHAUSTED
        assert "working on 80 characters of text (limit 100)" in info.value.message
        # Token ids count against the same budget: one character an id.
        with pytest.raises(Overloaded):
            await service.embed_token_ids("", [[2] * 30], EmbedOptions())
        stream = asyncio.ensure_future(service.embed_group("", [thirty], EmbedOptions()))
        await asyncio.sleep(0.05)
        assert not stream.done()
        queued = worker.queued_items
    assert (await first).vectors.shape == (1, HIDDEN)
    group = await asyncio.wait_for(stream, 10)
    assert queued == 1  # the stream message waited for room, not in the queue
    assert group.errors == [] and group.vectors.shape == (1, HIDDEN)
    assert (await service.embed("", [thirty], EmbedOptions())).vectors.shape == (1, HIDDEN)


async def test_queued_tokens_limit_refuses_unary_calls_but_not_stream_messages(
    make_service: MakeService, worker: Scheduler
) -> None:
    service = make_service(Limits(max_queued_tokens=5))
    with compute_held(worker):
        first = asyncio.ensure_future(service.embed("", ["the cat a dog the cat"], EmbedOptions()))
        await until(lambda: worker.queued_tokens == 6)
        with pytest.raises(Overloaded) as info:
            await service.embed("", ["the cat"], EmbedOptions())
        assert "has 6 tokens queued (limit 5)" in info.value.message
        stream = asyncio.ensure_future(service.embed_group("", ["the cat"], EmbedOptions()))
        await until(lambda: worker.queued_tokens == 8)
    assert (await first).token_counts == [6]
    assert (await asyncio.wait_for(stream, 10)).errors == []


async def test_token_ids_embed_like_the_text_they_come_from(
    make_service: MakeService, fake: EmbeddingEngine
) -> None:
    service = make_service()
    text = "the cat and a dog"
    ids = fake.tokenize([text], EmbedOptions())[0].ids
    from_text = await service.embed("", [text], EmbedOptions())
    from_ids = await service.embed_token_ids("", [ids], EmbedOptions())
    np.testing.assert_array_equal(from_ids.vectors, from_text.vectors)
    assert from_ids.token_counts == from_text.token_counts == [len(ids)]

    long = ids * 3  # 15 ids; the window is 8
    start = await service.embed_token_ids("", [long], EmbedOptions(truncation=Truncation.START))
    last = await service.embed_token_ids("", [long[-8:]], EmbedOptions())
    np.testing.assert_array_equal(start.vectors, last.vectors)
    assert start.truncated == [True] and start.token_counts == [8]
    end = await service.embed_token_ids("", [long], EmbedOptions(truncation=Truncation.END))
    first = await service.embed_token_ids("", [long[:8]], EmbedOptions())
    np.testing.assert_array_equal(end.vectors, first.vectors)


async def test_bad_token_ids_are_refused_with_the_list_and_position(
    make_service: MakeService, fake: EmbeddingEngine
) -> None:
    service = make_service(Limits(max_texts_per_request=3))
    vocab = fake.tokenizer.vocab_size
    error = ErrorKind.INVALID_ARGUMENT
    cases: list[tuple[list[list[int]], EmbedOptions, str]] = [
        ([], EmbedOptions(), "the token id lists are empty"),
        ([[2]] * 4, EmbedOptions(), "4 token id lists in one request; the limit is 3"),
        ([[2, 3], []], EmbedOptions(), "token id list 1 is empty"),
        (
            [[2, 3], [2, vocab]],
            EmbedOptions(),
            f"token id list 1 has {vocab} at position 1, which is not a token of model "
            f"'fake' (ids run from 0 to {vocab - 1})",
        ),
        ([[-1]], EmbedOptions(), "token id list 0 has -1 at position 0"),
        (
            [[2] * 9],
            EmbedOptions(truncation=Truncation.ERROR),
            "token id list 0 has 9 tokens but model 'fake' accepts at most 8",
        ),
        (
            [[2]],
            EmbedOptions(prompt_kind=PromptKind.NAME, prompt_value="query"),
            "prompts apply to texts; token ids are embedded as they are",
        ),
    ]
    for ids, options, message in cases:
        with pytest.raises(InvalidArgument) as info:
            await service.embed_token_ids("", ids, options)
        assert info.value.kind is error
        assert message in info.value.message, ids


async def test_a_draining_service_refuses_new_work_and_finishes_what_it_has(
    make_service: MakeService, worker: Scheduler
) -> None:
    service = make_service()
    with compute_held(worker):
        running = asyncio.ensure_future(service.embed("", ["the cat"], EmbedOptions()))
        await until(lambda: worker.queued_items > 0)
        service.accepting = False
        with pytest.raises(Unavailable) as info:
            await service.embed("", ["the cat"], EmbedOptions())
        assert info.value.kind is ErrorKind.UNAVAILABLE
        assert "shutting down; retry on another instance" in info.value.message
        with pytest.raises(Unavailable):
            await service.embed("", [], EmbedOptions())  # draining is said before anything
        with pytest.raises(Unavailable):
            await service.embed_token_ids("", [[2]], EmbedOptions())
        group = await service.embed_group("", ["a", "b"], EmbedOptions())
        assert [i for i, _ in group.errors] == [0, 1]
        assert all(isinstance(e, Unavailable) for _, e in group.errors)
    assert (await running).vectors.shape == (1, HIDDEN)


# --- stream messages: per-item errors ------------------------------------------------------


async def test_stream_message_reports_bad_items_and_embeds_the_rest(
    make_service: MakeService, fake: EmbeddingEngine, network: TableNetwork
) -> None:
    service = make_service(Limits(max_chars_per_text=40))
    texts = ["the cat", "", "x" * 41, "a dog", "the a the a the a the a the"]
    group = await service.embed_group("", texts, EmbedOptions(truncation=Truncation.ERROR))
    assert group.size == 5
    assert [i for i, _ in group.errors] == [1, 2, 4]
    assert all(isinstance(e, InvalidArgument) for _, e in group.errors)
    messages = [e.message for _, e in group.errors]
    assert messages[0] == "text is empty: send at least one character"
    assert messages[1] == "text has 41 characters; the limit is 40: split it"
    assert messages[2].startswith("text has more than 8 tokens but the model accepts at most 8")
    np.testing.assert_allclose(
        group.vectors, expected(fake, network, ["the cat", "a dog"]), rtol=1e-6
    )
    assert group.token_counts == [2, 2] and group.truncated == [False, False]
    assert group.space is not None and group.space.dimensions == HIDDEN


@pytest.mark.parametrize(
    ("model", "options", "kind", "message"),
    [
        ("no-such-model", EmbedOptions(), ModelNotFound, "unknown model 'no-such-model'"),
        ("", InvalidArgument("sticky options were bad"), InvalidArgument, "sticky options"),
        (
            "",
            EmbedOptions(prompt_kind=PromptKind.NAME, prompt_value="nope"),
            InvalidArgument,
            "has no prompt named 'nope'; its prompts: query",
        ),
    ],
)
async def test_what_stops_a_whole_message_is_every_items_error(
    make_service: MakeService,
    model: str,
    options: EmbedOptions | EmbedError,
    kind: type[EmbedError],
    message: str,
) -> None:
    service = make_service()
    group = await service.embed_group(model, ["the cat", "a dog", "the"], options)
    assert group.size == 3 and group.space is None and group.vectors.size == 0
    assert [i for i, _ in group.errors] == [0, 1, 2]
    for _, error in group.errors:
        assert type(error) is kind and message in error.message
    empty = await service.embed_group(model, [], options)
    assert (empty.size, empty.space, empty.errors, empty.token_counts) == (0, None, [], [])


async def test_a_failing_network_fails_the_call_but_does_not_refuse_the_model(
    make_service: MakeService,
) -> None:
    service = make_service()
    with pytest.raises(EmbedError) as info:
        await service.embed("", ["the cat", f"a {FAIL_WORD} text"], EmbedOptions())
    assert type(info.value) is EmbedError and info.value.kind is ErrorKind.INTERNAL
    assert info.value.message == f"computing the embeddings failed: RuntimeError: {FAIL_MESSAGE}"
    group = await service.embed_group("", ["the cat", FAIL_WORD], EmbedOptions())
    failed = dict(group.errors)
    assert 1 in failed
    assert {e.message for e in failed.values()} == {info.value.message}
    assert len(group.vectors) + len(failed) == 2
    assert (await service.embed("", ["the cat"], EmbedOptions())).vectors.shape == (1, HIDDEN)
    assert status_of(service, FAKE) == (ModelState.LOADED, "")


# --- refused models ------------------------------------------------------------------------


async def test_non_finite_vectors_refuse_the_model_until_restart(
    make_service: MakeService, notes: Notes
) -> None:
    service = make_service()
    assert not service.can_serve()  # not ready yet
    service.ready = True
    assert service.can_serve() and service.capacity_reason() == ""
    with pytest.raises(ModelNotAvailable) as info:
        await service.embed("", ["the cat", f"an {NAN_WORD}"], EmbedOptions())
    reason = info.value.message
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION
    assert "model 'fake' produced non-finite values (NaN or inf) for 1 texts" in reason
    assert "refused until the server restarts" in reason
    assert "`akidb-embed pull fake --force`" in reason

    await until(lambda: service.residents.get(FAKE) is None)  # unloaded, pinned or not
    await until(lambda: (FAKE, False) in notes)
    for name in (FAKE, ""):
        with pytest.raises(ModelNotAvailable) as again:
            await service.engine(name)
        assert again.value.message == reason
    with pytest.raises(ModelNotAvailable):
        await service.embed("", ["the cat"], EmbedOptions())
    assert status_of(service, FAKE) == (ModelState.FAILED, reason)
    assert not service.can_serve()  # the default model is refused
    group = await service.embed_group("", ["the cat", "a dog"], EmbedOptions())
    assert [type(e) for _, e in group.errors] == [ModelNotAvailable, ModelNotAvailable]


async def test_a_non_finite_stream_item_fails_alone(
    make_service: MakeService, fake: EmbeddingEngine, network: TableNetwork
) -> None:
    service = make_service()
    group = await service.embed_group("", ["the cat", NAN_WORD, "a dog"], EmbedOptions())
    [(index, error)] = group.errors
    assert index == 1 and isinstance(error, ModelNotAvailable)
    assert "non-finite" in error.message
    assert np.isfinite(group.vectors).all()
    np.testing.assert_allclose(
        group.vectors, expected(fake, network, ["the cat", "a dog"]), rtol=1e-6
    )
    assert group.token_counts == [2, 2]


# --- the model lifecycle -------------------------------------------------------------------


async def test_on_demand_load_self_check_unload_and_reload(
    make_service: MakeService,
    registry: Registry,
    qwen_source: Path,
    tmp_path: Path,
    notes: Notes,
) -> None:
    add_qwen(registry, qwen_source, tmp_path)
    service = make_service()
    assert status_of(service, QWEN) == (ModelState.ON_DISK, "")
    engine = await service.engine(QWEN)
    assert status_of(service, QWEN) == (ModelState.LOADED, "")
    assert notes == [(QWEN, True)]
    assert engine.self_check.startswith("recorded 16 probe vectors")
    assert engine.records_folder is not None
    assert list(engine.records_folder.glob("selfcheck-*.json"))
    result = await service.embed(QWEN, ["the cat"], EmbedOptions())
    assert result.model == QWEN and result.vectors.shape == (1, 64)

    await service.unload(QWEN)
    assert status_of(service, QWEN) == (ModelState.ON_DISK, "")
    assert notes == [(QWEN, True), (QWEN, False)]
    assert QWEN not in [e.name for e in service.loaded()]
    again = await service.engine(QWEN)
    assert again is not engine
    assert again.self_check.startswith("passed: ")  # compared with the first load's record
    np.testing.assert_array_equal(
        (await service.embed(QWEN, ["the cat"], EmbedOptions())).vectors, result.vectors
    )


async def test_concurrent_requests_share_one_load_and_loading_is_reported(
    make_service: MakeService,
    registry: Registry,
    worker: Scheduler,
    qwen_source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_qwen(registry, qwen_source, tmp_path)
    service = make_service()
    loads = count_loads(monkeypatch)
    with compute_held(worker):
        waiting = [asyncio.ensure_future(service.engine(QWEN)) for _ in range(3)]
        await until(lambda: status_of(service, QWEN)[0] is ModelState.LOADING)
    engines = await asyncio.gather(*waiting)
    assert engines[0] is engines[1] is engines[2]
    assert len(loads) == 1
    assert status_of(service, QWEN) == (ModelState.LOADED, "")


async def test_a_failed_load_is_reported_and_retried_once_the_files_are_fixed(
    make_service: MakeService,
    registry: Registry,
    qwen_source: Path,
    tmp_path: Path,
    notes: Notes,
) -> None:
    directory = add_qwen(registry, qwen_source, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(b"\x00not weights" * 100)
    service = make_service()
    with pytest.raises(ModelLoadError) as info:
        await service.embed(QWEN, ["the cat"], EmbedOptions())
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION
    assert f"cannot read weights {weights}" in info.value.message
    state, reason = status_of(service, QWEN)
    assert state is ModelState.FAILED and reason == info.value.message
    assert notes == [(QWEN, False)]
    group = await service.embed_group(QWEN, ["the cat"], EmbedOptions())
    assert isinstance(group.errors[0][1], ModelLoadError)

    shutil.copy(qwen_source / "model.safetensors", weights)
    assert (await service.embed(QWEN, ["the cat"], EmbedOptions())).vectors.shape == (1, 64)
    assert status_of(service, QWEN) == (ModelState.LOADED, "")
    assert notes[-1] == (QWEN, True)
    await service.unload(QWEN)  # the old failure is forgotten, not shown again
    assert status_of(service, QWEN) == (ModelState.ON_DISK, "")


async def test_an_unexpected_load_error_is_a_load_error_naming_the_model(
    make_service: MakeService,
    registry: Registry,
    qwen_source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_qwen(registry, qwen_source, tmp_path)
    service = make_service()

    def broken(directory: Path, **kwargs: Any) -> EmbeddingEngine:
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(service_module, "load_engine", broken)
    with pytest.raises(ModelLoadError) as info:
        await service.engine(QWEN)
    assert info.value.message == "model 'tiny-qwen' failed to load: the disk went away"
    assert status_of(service, QWEN) == (ModelState.FAILED, info.value.message)
    assert service.residents.get(QWEN) is None


async def test_models_not_downloaded_or_unknown(make_service: MakeService, notes: Notes) -> None:
    service = make_service()
    with pytest.raises(ModelNotAvailable) as info:
        await service.engine("bge-small-en-v1.5")
    assert "'bge-small-en-v1.5' (BAAI/bge-small-en-v1.5) is not downloaded" in info.value.message
    assert "run `akidb-embed pull bge-small-en-v1.5` first" in info.value.message
    # Not a failure of the model: it stays "not downloaded", with the command.
    assert status_of(service, "bge-small-en-v1.5") == (
        ModelState.NOT_DOWNLOADED,
        "run `akidb-embed pull bge-small-en-v1.5`",
    )
    with pytest.raises(ModelNotFound):
        await service.engine("nomic-embed")
    assert notes == []


async def test_the_budget_refuses_a_load_when_every_model_is_pinned_or_busy(
    make_service: MakeService,
    registry: Registry,
    qwen_source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_qwen(registry, qwen_source, tmp_path)
    loads = count_loads(monkeypatch)
    service = make_service(budget=ModelBudget(max_models=1))
    with pytest.raises(Overloaded) as info:
        await service.engine(QWEN)
    assert info.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "loading 'tiny-qwen' would exceed the model budget (max 1 models" in info.value.message
    assert "--max-loaded-models" in info.value.message
    assert loads == []  # refused before reading the weights
    assert status_of(service, QWEN) == (ModelState.ON_DISK, "")

    # Room for one more: an idle model loaded on demand is evicted, a busy one is not.
    add_qwen(registry, qwen_source, tmp_path, "tiny-qwen-b")
    roomy = make_service(budget=ModelBudget(max_models=2))
    await roomy.engine(QWEN)
    with roomy.residents.use(QWEN), pytest.raises(Overloaded):
        await roomy.engine("tiny-qwen-b")
    await roomy.engine("tiny-qwen-b")
    assert sorted(e.name for e in roomy.loaded()) == [FAKE, "tiny-qwen-b"]
    assert status_of(roomy, QWEN) == (ModelState.ON_DISK, "")


async def test_int8_calibrates_on_the_first_request_and_later_loads_read_it(
    make_service: MakeService, registry: Registry, qwen_source: Path, tmp_path: Path
) -> None:
    add_qwen(registry, qwen_source, tmp_path)
    service = make_service()
    engine = await service.engine(QWEN)
    assert engine.calibration is None and engine.records_folder is not None
    options = EmbedOptions(encoding=Encoding.INT8)
    result = await service.embed(QWEN, ["the cat", "a dog"], options)
    assert result.vectors.dtype == np.int8 and result.vectors.shape == (2, 64)
    assert result.space.encoding is Encoding.INT8 and result.space.ranges_id
    assert engine.calibration is not None and engine.calibration.shape[1] == 64
    assert list(engine.records_folder.glob("calibration-*.npy"))

    fresh = await make_service().engine(QWEN)
    assert fresh.calibration is not None
    np.testing.assert_array_equal(fresh.calibration, engine.calibration)


# --- loads at once, and names with a revision -----------------------------------------


async def test_concurrent_loads_of_different_models_respect_the_budget(
    make_service: MakeService,
    registry: Registry,
    worker: Scheduler,
    qwen_source: Path,
    tmp_path: Path,
) -> None:
    add_qwen(registry, qwen_source, tmp_path, "tiny-qwen-a")
    add_qwen(registry, qwen_source, tmp_path, "tiny-qwen-b")
    service = make_service(budget=ModelBudget(max_models=2))  # the table model and one more
    checked: list[int] = []
    evictions_for = service.residents.evictions_for

    def counting(incoming_bytes: int) -> list[str] | None:
        checked.append(incoming_bytes)
        return evictions_for(incoming_bytes)

    service.residents.evictions_for = counting  # type: ignore[method-assign]
    with compute_held(worker):
        loads = [
            asyncio.ensure_future(service.engine(name)) for name in ("tiny-qwen-a", "tiny-qwen-b")
        ]
        with contextlib.suppress(AssertionError):
            await until(lambda: len(checked) == 2, timeout=2)
    await asyncio.gather(*loads, return_exceptions=True)
    assert len(service.loaded()) <= 2


def cache_snapshot(root: Path, repo_id: str, source: Path, commit: str, revision: str) -> None:
    """`source`'s files pulled into the cache as `repo_id` at `commit` (`revision` names it)."""
    repo = RepoCache(repo_id, root)
    files = {}
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = str(file.relative_to(source))
        target = repo.snapshot(commit) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        data = file.read_bytes()
        target.write_bytes(data)
        files[relative] = ManifestFile(len(data), hashlib.sha256(data).hexdigest())
    repo.write_manifest(Manifest(repo_id, revision, commit, files))
    repo.write_ref(revision, commit)


async def test_a_model_loaded_by_revision_is_listed_as_loaded(
    make_service: MakeService, cache: Path, qwen_source: Path
) -> None:
    cache_snapshot(cache, "acme/tiny-qwen", qwen_source, "c" * 40, "v1")
    service = make_service()
    engine = await service.engine("acme/tiny-qwen@v1")
    assert engine.revision == "c" * 40
    assert status_of(service, "acme/tiny-qwen@v1") == (ModelState.LOADED, "")
