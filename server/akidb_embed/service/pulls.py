"""Finding a model's files for the server: content checks and Hub pulls off the shared threads.

A pull can hang on a slow or silent Hub, and a content check reads every byte of a model.
Neither may hold what other models' requests need: the event loop's default executor
(`asyncio.to_thread`: tokenisation, shutdown), the compute thread, or a lock. So each runs on
a thread of its own, and pulls are bounded:

- in number: past `max_concurrent` pulls in progress, a request that needs another pull gets
  RESOURCE_EXHAUSTED at once (requests for a model already being pulled wait for that pull);
- in time: each Hub request times out after min(30 s, `timeout_s`), and requests waiting on a
  pull get UNAVAILABLE once it has run `timeout_s`. A pull thread that outlives its time still
  counts against the cap until its Hub request times out, so hung pulls cannot pile up.

The threads are daemons: a server that exits does not wait for a hung Hub. A pull killed that
way leaves a partial file the next pull removes (hub.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import HubUnavailable, ModelNotAvailable, Overloaded
from ..store.registry import LocatedModel, ModelEntry, Registry

T = TypeVar("T")

# huggingface_hub's own per-request timeout in hub.py.
HUB_REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PullLimits:
    # Pulls from the Hub in progress at once (distinct models); past it, RESOURCE_EXHAUSTED.
    max_concurrent: int = 2
    # Requests waiting on a pull get UNAVAILABLE after this long; also bounds each Hub request.
    timeout_s: float = 600.0


def in_own_thread(fn: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """Run `fn` on a new daemon thread; its result or exception lands in the future."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class ModelFetcher:
    def __init__(
        self, registry: Registry, limits: PullLimits | None = None, allow_downloads: bool = False
    ) -> None:
        self.registry = registry
        self.limits = limits or PullLimits()
        self.allow_downloads = allow_downloads
        self._lock = threading.Lock()
        # Pull threads started and not finished (one may outlive its request's wait).
        self._pulling = 0

    @property
    def pulls_in_progress(self) -> int:
        with self._lock:
            return self._pulling

    async def locate(self, entry: ModelEntry, notify: Callable[[str], None]) -> LocatedModel:
        """The entry's files, content verified; pulled first when missing and downloads are
        allowed. Raises DamagedModel, ModelNotAvailable, Overloaded (too many pulls),
        HubUnavailable (pull timed out) and the pull's own errors."""
        check = in_own_thread(lambda: self.registry.verified(entry), f"akidb-verify-{entry.name}")
        located = await asyncio.wrap_future(check)
        if located is not None:
            return located
        if not self.allow_downloads:
            raise ModelNotAvailable(self.registry.missing_message(entry))
        return await self._pull(entry, notify)

    async def _pull(self, entry: ModelEntry, notify: Callable[[str], None]) -> LocatedModel:
        limit = self.limits.max_concurrent
        with self._lock:
            if self._pulling >= limit:
                raise Overloaded(
                    f"the server is already pulling {self._pulling} models from the Hub, its "
                    f"limit ({limit}); retry {entry.name!r} later, or pull it ahead of time with "
                    f"`akidb-embed pull {entry.name}` (the server's --max-concurrent-pulls "
                    "raises the limit)"
                )
            self._pulling += 1
        request_timeout = min(HUB_REQUEST_TIMEOUT_S, self.limits.timeout_s)

        def pull() -> LocatedModel:
            try:
                return self.registry.pull(
                    entry,
                    progress=False,
                    notify=notify,
                    request_timeout_s=request_timeout,
                    lock_timeout_s=self.limits.timeout_s,
                )
            finally:
                with self._lock:
                    self._pulling -= 1

        running = in_own_thread(pull, f"akidb-pull-{entry.name}")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(running), self.limits.timeout_s)
        except asyncio.TimeoutError:
            from ..store.hub import endpoint

            raise HubUnavailable(
                f"pulling {entry.name!r} ({entry.source}) from the Hub at {endpoint()} did not "
                f"finish within {self.limits.timeout_s:g} s: the Hub is slow or not answering; "
                f"retry later, or pull it ahead of time with `akidb-embed pull {entry.name}` "
                "(the server's --pull-timeout raises the limit)"
            ) from None
