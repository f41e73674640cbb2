"""A pool of replicas: many endpoints behind gRPC's round_robin, and bulk streams that fail
over without losing an item.

Targets that name a pool: a list of addresses (`["10.0.0.5:50051", "10.0.0.6:50051"]`), a
comma-separated `ipv4:`/`ipv6:` target, or a `dns:///name:port` target (a headless
Kubernetes Service: one A record per ready pod; grpc re-resolves it when connections fail).
The channel uses grpc's own `round_robin` policy with client-side health checking, so a
replica that reports NOT_SERVING (starting, or draining after SIGTERM) gets no new calls, and
a service config that retries the idempotent unary calls on UNAVAILABLE on the next replica.

`embed_stream` on a pool (`PoolStream`) splits the caller's items into messages and spreads
them over several concurrent sub-streams (round_robin puts each on the next ready replica).
Every sub-stream keeps the messages it has sent and not yet had answered: when it breaks
with UNAVAILABLE (the replica died or went away) or its replica answers items with
UNAVAILABLE (it is draining), those items are sent again on another sub-stream. Results are
merged back in the caller's order, each id exactly once. Nothing is kept on the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from .client import Space, StreamResult

# Sub-streams of one pool stream, at most.
MAX_SUBSTREAMS = 8
# Times one item may be sent again before its UNAVAILABLE becomes the caller's result, and
# consecutive failed (re)opens of one sub-stream before the stream fails with UNAVAILABLE.
DEFAULT_MAX_ATTEMPTS = 6
# Backoff between re-opens of a sub-stream: doubles from the first to the cap.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 1.0
# A message unanswered for this many times the usual answer time (and at least
# HEDGE_MIN_S), while another sub-stream is idle, is sent again there; the first answer wins.
HEDGE_FACTOR = 4.0
# A sub-stream whose answers take this many times the quickest one's gets one message at once.
SLOW_FACTOR = 4.0
HEDGE_MIN_S = 0.02
HEDGE_POLL_S = 0.01
# Statuses of a broken sub-stream whose unanswered items go to another replica. Everything
# else (INVALID_ARGUMENT, DEADLINE_EXCEEDED, ...) is the caller's and ends the stream.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

_SERVICE = "akidb.embedding.v1.EmbeddingService"


def service_config(max_attempts: int = 4) -> str:
    """round_robin over the resolved addresses; skip replicas whose grpc.health.v1 status is
    not SERVING; retry the idempotent unary calls on UNAVAILABLE (a retry goes to the next
    replica). Streams are not retried by grpc: `PoolStream` resumes them itself."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": ""},
            "methodConfig": [
                {
                    "name": [
                        {"service": _SERVICE, "method": method}
                        for method in ("Embed", "ListModels", "Health")
                    ],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def _split_host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"invalid replica address {address!r}: expected host:port")
    return host.strip("[]"), port


def _resolve(host: str, port: str) -> list[str]:
    """`host` as IP literals (itself if it is one), in the resolver's order."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def list_target(addresses: Sequence[str]) -> str:
    """A grpc target naming every address of `addresses` (host:port each; names are resolved
    now), e.g. `ipv4:10.0.0.5:50051,10.0.0.6:50051`."""
    if not addresses:
        raise ValueError("a pool needs at least one address")
    v4: list[str] = []
    v6: list[str] = []
    for address in addresses:
        host, port = _split_host_port(address)
        for ip in _resolve(host, port):
            if ipaddress.ip_address(ip).version == 4:
                v4.append(f"{ip}:{port}")
            else:
                v6.append(f"[{ip}]:{port}")
    if v4 and v6:
        raise ValueError("a pool's addresses must be all IPv4 or all IPv6")
    return f"ipv4:{','.join(v4)}" if v4 else f"ipv6:{','.join(v6)}"


def is_pool_target(target: str) -> bool:
    """`dns:` targets and `ipv4:`/`ipv6:` lists name pools; a socket or host:port does not."""
    return target.startswith("dns:") or (target.startswith(("ipv4:", "ipv6:")) and "," in target)


def count_endpoints(target: str) -> int:
    """How many replicas a target names now (a `dns:` name is looked up; 1 if it fails)."""
    if target.startswith(("ipv4:", "ipv6:")):
        return len(target.split(":", 1)[1].split(","))
    if target.startswith("dns:"):
        name = target[len("dns:") :].lstrip("/")
        if "/" in name:  # dns://authority/name
            name = name.split("/", 1)[1]
        try:
            host, port = _split_host_port(name)
            return max(1, len(_resolve(host, port)))
        except (OSError, ValueError):
            return 1
    return 1


@dataclass
class PoolCounters:
    """What the client did to keep its streams whole (cumulative, per client)."""

    streams_opened: int = 0  # sub-streams started, re-opens included
    streams_broken: int = 0  # sub-streams that ended with UNAVAILABLE/CANCELLED
    resent_items: int = 0  # items sent again on another sub-stream
    resent_messages: int = 0
    drained_items: int = 0  # items a draining replica answered with UNAVAILABLE
    hedged_items: int = 0  # items of a late message sent again on an idle sub-stream
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass
class _Chunk:
    """Items of one message: their positions in the caller's stream, ids and texts."""

    indices: list[int]
    ids: list[str]
    texts: list[str]
    attempt: int = 0
    sent_at: float = 0.0
    hedged: bool = False  # a copy went to another sub-stream: the first answer wins


@dataclass
class _Sub:
    """One sub-stream's view: what it sent and has not had answered, in order."""

    unanswered: deque[_Chunk] = field(default_factory=deque)
    items: int = 0
    closing: bool = False  # its replica is draining: send nothing more, reopen elsewhere
    broken: bool = False
    first: bool = True
    space: Space | None = None  # the last space this sub-stream received
    call: grpc.RpcContext | None = None
    latency: float | None = None  # seconds from sending a message to its answer (average)


class PoolStream:
    """One `embed_stream` over a pool (see the module docstring). Used by EmbedClient."""

    def __init__(
        self,
        stub: pb_grpc.EmbeddingServiceStub,
        model: str,
        options: pb.EmbedOptions,
        *,
        timeout: float | None,
        max_in_flight: int,
        max_items: int,
        max_chars: int,
        streams: int,
        counters: PoolCounters,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.stub = stub
        self.model = model
        self.options = options
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.max_in_flight = max(1, max_in_flight)
        self.max_items = max(1, max_items)
        self.max_chars = max_chars
        self.streams = max(1, min(streams, MAX_SUBSTREAMS))
        # A sub-stream takes new work only while it has less than this unanswered: a slow
        # replica holds little, and the others take the rest.
        self.window = max(self.max_items, self.max_in_flight // self.streams)
        self.counters = counters
        self.max_attempts = max_attempts
        self.cond = threading.Condition()
        self.pending: deque[tuple[int, str, str]] = deque()
        self.retry: deque[_Chunk] = deque()
        self.done: dict[int, StreamResult] = {}
        self.next_out = 0
        self.taken = 0
        self.input_done = False
        self.input_error: BaseException | None = None
        self.fatal: Exception | None = None
        self.finished = False
        self.subs: list[_Sub] = []
        self.live_workers = 0

    # --- the caller's side ---------------------------------------------------------------

    def run(self, items: Iterable[tuple[str, str]]) -> Iterator[StreamResult]:
        from .client import EmbedClientError

        threads = [threading.Thread(target=self._read, args=(items,), daemon=True)]
        self.live_workers = self.streams
        for n in range(self.streams):
            threads.append(
                threading.Thread(target=self._worker, args=(n,), daemon=True, name=f"pool-{n}")
            )
        for thread in threads:
            thread.start()
        try:
            while True:
                with self.cond:
                    while True:
                        if self.next_out in self.done:
                            result = self.done.pop(self.next_out)
                            self.next_out += 1
                            self.cond.notify_all()
                            break
                        if self.fatal is not None:
                            raise self.fatal
                        if self.finished:  # cancel(): the caller wants nothing more
                            return
                        if self.input_done and self.next_out == self.taken:
                            if self.input_error is not None:
                                raise self.input_error
                            return
                        if self.live_workers == 0:
                            raise EmbedClientError(
                                grpc.StatusCode.INTERNAL,
                                f"stream workers ended with {self.taken - self.next_out} "
                                "items unanswered",
                            )
                        self.cond.wait()
                yield result
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop from another thread: `run` returns, the sub-streams are cancelled and no more
        items are read."""
        with self.cond:
            self.finished = True
            calls = [s.call for s in self.subs if s.call is not None]
            self.cond.notify_all()
        for call in calls:
            call.cancel()

    def _read(self, items: Iterable[tuple[str, str]]) -> None:
        try:
            for item_id, text in items:
                with self.cond:
                    while self.taken - self.next_out >= self.max_in_flight and not self.finished:
                        self.cond.wait()
                    if self.finished:
                        return
                    self.pending.append((self.taken, item_id, text))
                    self.taken += 1
                    if len(self.pending) == 1:
                        self.cond.notify_all()
        except BaseException as exc:  # the caller's iterable failed: end the stream
            self.input_error = exc
        with self.cond:
            self.input_done = True
            self.cond.notify_all()

    # --- sub-streams -----------------------------------------------------------------------

    def _take(self) -> _Chunk:
        """(lock held) A message from the pending items: what is there, up to the limits."""
        chunk = _Chunk([], [], [])
        chars = 0
        pending = self.pending
        while pending and len(chunk.ids) < self.max_items:
            if chunk.ids and chars + len(pending[0][2]) > self.max_chars:
                break
            index, item_id, text = pending.popleft()
            chunk.indices.append(index)
            chunk.ids.append(item_id)
            chunk.texts.append(text)
            chars += len(text)
        return chunk

    def _fastest(self, but: _Sub | None = None) -> float | None:
        """(lock held) The answer time of the quickest live sub-stream (other than `but`)."""
        times = [
            s.latency for s in self.subs if s is not but and not s.broken and s.latency is not None
        ]
        return min(times) if times else None

    def _has_room(self, sub: _Sub) -> bool:
        """A full message more stays within the sub-stream's share of the window. A
        sub-stream much slower than the quickest gets one message at a time: the others
        take the rest, and its late message is hedged (`_hedge_for`)."""
        if sub.items == 0:
            return True
        fastest = self._fastest(but=sub)
        if sub.latency is not None and fastest is not None and sub.latency > SLOW_FACTOR * fastest:
            return False
        return sub.items + self.max_items <= self.window

    def _no_more_work(self) -> bool:
        return self.input_done and not self.pending and not self.retry

    def _hedge_for(self, sub: _Sub) -> _Chunk | None:
        """(lock held) The oldest message another sub-stream has held unanswered for much
        longer than messages take, not hedged yet: `sub` (idle) sends a copy of it."""
        fastest = self._fastest()
        if fastest is None or sub.items:
            return None
        limit = time.monotonic() - max(HEDGE_MIN_S, HEDGE_FACTOR * fastest)
        oldest: _Chunk | None = None
        for other in self.subs:
            if other is sub or other.broken or not other.unanswered:
                continue
            chunk = other.unanswered[0]
            if chunk.hedged or chunk.sent_at > limit:
                continue
            if oldest is None or chunk.sent_at < oldest.sent_at:
                oldest = chunk
        if oldest is None:
            return None
        oldest.hedged = True
        self.counters.add(hedged_items=len(oldest.ids))
        return _Chunk(oldest.indices, oldest.ids, oldest.texts, oldest.attempt, hedged=True)

    def _requests(self, sub: _Sub) -> Iterator[pb.EmbedStreamRequest]:
        while True:
            with self.cond:
                hedge = None
                while True:
                    if self.finished or self.fatal is not None or sub.closing or sub.broken:
                        return
                    if self._has_room(sub) and (self.retry or self.pending):
                        break
                    hedge = self._hedge_for(sub)
                    if hedge is not None:
                        break
                    if self._no_more_work() and not any(s.unanswered for s in self.subs):
                        return  # half-close: the replica answers what it has, then ends
                    # Wake now and then to see whether another sub-stream's answer is late.
                    self.cond.wait(None if self._fastest() is None else HEDGE_POLL_S)
                chunk = hedge or (self.retry.popleft() if self.retry else self._take())
                chunk.sent_at = time.monotonic()
                sub.unanswered.append(chunk)
                sub.items += len(chunk.ids)
                request = pb.EmbedStreamRequest(ids=chunk.ids, texts=chunk.texts)
                if sub.first:  # model and options are sticky for the rest of the stream
                    sub.first = False
                    request.model = self.model
                    request.options.CopyFrom(self.options)
            yield request

    def _requeue(self, sub: _Sub) -> int:
        """(lock held) Everything `sub` sent and had no answer for goes to the retry queue,
        in order, ahead of what is there (it is older)."""
        # Messages answered meanwhile on another sub-stream (hedged copies) are not resent.
        chunks = [
            c
            for c in sub.unanswered
            if any(i >= self.next_out and i not in self.done for i in c.indices)
        ]
        sub.unanswered.clear()
        sub.items = 0
        items = sum(len(c.ids) for c in chunks)
        for chunk in reversed(chunks):
            chunk.attempt += 1
            self.retry.appendleft(chunk)
        if items:
            self.counters.add(resent_items=items, resent_messages=len(chunks))
        self.cond.notify_all()
        return items

    def _answer(self, sub: _Sub, response: pb.EmbedStreamResponse) -> None:
        from .client import EmbedClientError, Space, decode_stream_results

        with self.cond:
            if not sub.unanswered:
                raise EmbedClientError(
                    grpc.StatusCode.INTERNAL, "a replica answered a message that was not sent"
                )
            chunk = sub.unanswered.popleft()
            sub.items -= len(chunk.ids)
            took = time.monotonic() - chunk.sent_at
            sub.latency = took if sub.latency is None else 0.7 * sub.latency + 0.3 * took
            if list(response.ids) != chunk.ids:
                raise EmbedClientError(
                    grpc.StatusCode.INTERNAL,
                    f"a replica answered ids {list(response.ids)[:3]}... for a message "
                    f"of {chunk.ids[:3]}...",
                )
            if response.HasField("space"):
                sub.space = Space.from_proto(response.space)
            results = decode_stream_results(response, sub.space)
            again = _Chunk([], [], [], chunk.attempt + 1)
            for position, result in enumerate(results):
                index = chunk.indices[position]
                if index < self.next_out or index in self.done:
                    continue  # answered already (a hedged copy, or a re-send): first wins
                error = result.error
                if (
                    error is not None
                    and error.code == grpc.StatusCode.UNAVAILABLE
                    and chunk.attempt < self.max_attempts
                ):
                    again.indices.append(chunk.indices[position])
                    again.ids.append(chunk.ids[position])
                    again.texts.append(chunk.texts[position])
                    continue
                self.done[index] = result
            if again.ids:
                # The replica is draining (or cannot compute): this sub-stream sends it
                # nothing more and reopens on another replica.
                self.retry.append(again)
                sub.closing = True
                self.counters.add(
                    drained_items=len(again.ids), resent_items=len(again.ids), resent_messages=1
                )
            self.cond.notify_all()

    def _remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _worker(self, n: int) -> None:
        from .client import EmbedClientError

        failures = 0
        last = ""
        try:
            # Stagger the first opens a little so that round_robin has every replica's
            # connection ready and puts each sub-stream on a different one.
            if n:
                time.sleep(min(0.2, 0.02 * n))
            while True:
                with self.cond:
                    if self.finished or self.fatal is not None:
                        return
                    if self._no_more_work():
                        return  # nothing left to send: do not open an idle stream
                    sub = _Sub()
                    self.subs.append(sub)
                try:
                    call = self.stub.EmbedStream(self._requests(sub), timeout=self._remaining())
                    with self.cond:
                        sub.call = call
                        if self.finished:
                            call.cancel()
                    self.counters.add(streams_opened=1)
                    for response in call:
                        failures = 0
                        self._answer(sub, response)
                    with self.cond:
                        if sub.unanswered:  # ended with OK but items unanswered
                            self._requeue(sub)
                            continue
                        if sub.closing:
                            continue  # drained replica: go on elsewhere
                        if self._no_more_work():
                            return
                except grpc.RpcError as error:
                    code = error.code()
                    with self.cond:
                        sub.broken = True
                        self.cond.notify_all()
                        if self.finished:
                            return
                        if code not in FAILOVER_CODES:
                            self.fatal = EmbedClientError.from_rpc_error(error)
                            return
                        self._requeue(sub)
                        self.counters.add(streams_broken=1)
                        failures += 1
                        last = f"{code.name}: {error.details()}"
                        if failures >= self.max_attempts:
                            self.fatal = EmbedClientError(
                                grpc.StatusCode.UNAVAILABLE,
                                f"no replica answered the stream after {failures} attempts "
                                f"(last: {last}); {self.taken - self.next_out} items "
                                "unanswered: check that the pool's replicas are up and "
                                "SERVING",
                            )
                            return
                        self.cond.wait(min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (failures - 1)))
                except EmbedClientError as error:
                    with self.cond:
                        self.fatal = error
                        return
        finally:
            with self.cond:
                self.live_workers -= 1
                self.cond.notify_all()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


async def bridge_to_async(
    stream: PoolStream, items: Iterable[tuple[str, str]] | AsyncIterable[tuple[str, str]]
) -> AsyncIterator[StreamResult]:
    """Run a PoolStream (threads, a blocking channel) under asyncio: `items` (sync or async)
    are fed to it from the event loop, its results come back to it; closing the iterator
    cancels the stream. For AsyncEmbedClient on a pool."""
    loop = asyncio.get_running_loop()
    # Bounded: the pool stream reads at most max_in_flight ahead, the feeder a little more.
    inbox: queue.Queue[object] = queue.Queue(maxsize=max(64, stream.max_items))
    out: asyncio.Queue[object] = asyncio.Queue()
    stopped = threading.Event()  # the caller closed the iterator

    def source() -> Iterator[tuple[str, str]]:
        while True:
            item = inbox.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]

    def deliver(item: object) -> bool:
        """Hand `item` to the loop; False once the caller has gone (the loop may be closed)."""
        if stopped.is_set():
            return False
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def run() -> None:
        try:
            for result in stream.run(source()):
                if not deliver(result):
                    return
        except BaseException as exc:
            deliver(_Failed(exc))
        finally:
            deliver(_END)

    def put_until_stopped(item: object) -> None:
        while not stopped.is_set():
            with contextlib.suppress(queue.Full):
                inbox.put(item, timeout=0.1)
                return

    async def put(item: object) -> None:
        try:
            inbox.put_nowait(item)
        except queue.Full:  # the stream is full: wait off the loop, never past the stream
            await asyncio.to_thread(put_until_stopped, item)

    async def feed() -> None:
        try:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    await put(item)
            else:
                for index, item in enumerate(items):
                    await put(item)
                    if index % 64 == 63:
                        await asyncio.sleep(0)
        except Exception as exc:
            await put(_Failed(exc))
            return
        await put(_END)

    worker = threading.Thread(target=run, daemon=True, name="pool-stream")
    worker.start()
    feeder = asyncio.ensure_future(feed())
    try:
        while True:
            got = await out.get()
            if got is _END:
                return
            if isinstance(got, _Failed):
                raise got.error
            yield got  # type: ignore[misc]
    finally:
        stopped.set()
        feeder.cancel()
        stream.cancel()
        with contextlib.suppress(queue.Full):
            inbox.put_nowait(_END)  # a reader waiting for input wakes and ends
