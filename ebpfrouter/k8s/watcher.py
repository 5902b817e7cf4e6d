"""Keep a local copy of one kind of Kubernetes object in sync: list, then watch.

The protocol, as client-go's reflector runs it: list (with a field selector) to get every
object and the list's resourceVersion, then watch from that version. A watch that ends
normally (server timeout) is resumed from the last version seen; a watch whose version has
expired (410 Gone: `ApiException(status=410)` or an ERROR event with code 410) is followed by
a fresh list, which replaces the whole cache so that nothing missed in between survives;
any other error (API down, 5xx, timeouts) waits with exponential backoff, then re-lists.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import urllib3
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

HTTP_GONE = 410


class Backoff:
    """Exponential backoff with jitter: initial, doubled per failure up to `maximum`."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, jitter: float = 0.2) -> None:
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; counts a failure."""
        delay = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        """A success: the next failure starts from `initial` again."""
        self.failures = 0


class ListWatcher:
    """Runs list+watch for one resource in a thread and reports to two callbacks.

    `list_func` is a kubernetes client list method (e.g. `CoreV1Api.list_node`);
    `on_replace(items)` receives every object after each list, `on_event(type, obj)` each
    watch event (ADDED, MODIFIED, DELETED). Callbacks run on the watcher's thread.
    """

    def __init__(
        self,
        name: str,
        list_func: Callable[..., Any],
        on_replace: Callable[[list[Any]], None],
        on_event: Callable[[str, Any], None],
        *,
        field_selector: str | None = None,
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self._list = list_func
        api_client = getattr(getattr(list_func, "__self__", None), "api_client", None)
        self.host = getattr(getattr(api_client, "configuration", None), "host", None) or "?"
        self._on_replace = on_replace
        self._on_event = on_event
        self._kwargs: dict[str, Any] = {}
        if field_selector:
            self._kwargs["field_selector"] = field_selector
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.backoff = backoff or Backoff()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: watch.Watch | None = None
        self._lock = threading.Lock()
        self.resource_version: str | None = None
        self.last_error: str | None = None
        self.lists = 0  # how many full lists were done (1 + re-lists)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"k8s-watch-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the open watch; waits at most `timeout` seconds."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive():
            # Closing the stream's socket ends a blocked read; repeated, since the watch
            # request may still be on its way when stop() is first called.
            with self._lock:
                if self._watch is not None:
                    self._watch.stop()
            self._thread.join(0.05)
            if time.monotonic() >= deadline:
                break
        if self._thread is not None:
            if self._thread.is_alive():
                log.warning("%s watcher did not stop within %.1fs", self.name, timeout)
            self._thread = None

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the first list succeeded (within `timeout` seconds)."""
        return self._synced.wait(timeout)

    @property
    def synced(self) -> bool:
        """True once the first list succeeded."""
        return self._synced.is_set()

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._do_list()
                    need_list = False
                self._do_watch()
            except ApiException as exc:
                if self._stop.is_set():
                    break
                if exc.status == HTTP_GONE:
                    log.info("%s watch expired at resourceVersion %s: re-listing",
                             self.name, self.resource_version)
                    need_list = True
                    continue
                self._failed(f"Kubernetes API {self.host}: error {exc.status} {exc.reason}".strip())
                need_list = True
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if self._stop.is_set():
                    break
                self._failed(f"Kubernetes API {self.host} unreachable: {exc}")
                need_list = True
            except Exception as exc:  # a bad object or a callback bug: never kill the thread
                if self._stop.is_set():
                    break
                log.exception("%s: unexpected error", self.name)
                self._failed(f"{type(exc).__name__}: {exc}")
                need_list = True

    def _failed(self, message: str) -> None:
        delay = self.backoff.next_delay()
        self.last_error = message
        log.warning("%s: %s; retrying in %.1fs", self.name, message, delay)
        self._stop.wait(delay)

    def _do_list(self) -> None:
        result = self._list(_request_timeout=self.request_timeout, **self._kwargs)
        items = list(result.items or [])
        self.resource_version = result.metadata.resource_version
        self._on_replace(items)
        self.lists += 1
        self.last_error = None
        self.backoff.reset()
        self._synced.set()

    def _do_watch(self) -> None:
        stream_watch = watch.Watch()
        with self._lock:
            if self._stop.is_set():
                return
            self._watch = stream_watch
        try:
            # timeout_seconds makes the server end the stream; the client then raises 410
            # instead of retrying on its own, so this loop decides (resume or re-list).
            events = stream_watch.stream(
                self._list,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout,
                _request_timeout=(self.request_timeout, self.watch_timeout + self.request_timeout),
                **self._kwargs,
            )
            for event in events:
                if self._stop.is_set():
                    break
                kind, obj = event["type"], event["object"]
                if kind == "BOOKMARK":
                    # Progress without a change: resume from here, so quiet watches of a
                    # busy cluster do not fall behind the compaction point (no 410).
                    meta = (event.get("raw_object") or {}).get("metadata") or {}
                    if meta.get("resourceVersion"):
                        self.resource_version = meta["resourceVersion"]
                    continue
                version = getattr(getattr(obj, "metadata", None), "resource_version", None)
                self._on_event(kind, obj)
                if version:
                    self.resource_version = version
        finally:
            with self._lock:
                self._watch = None
        if not self._stop.is_set():
            self.backoff.reset()


class WatchedCache:
    """Lifecycle of a local cache that a `ListWatcher` (`self.watcher`) keeps in sync.

    Subclasses set `self.watcher` in `__init__`, pointing its callbacks at their own cache;
    this gives them `start`, `stop`, `wait_synced` and use as a context manager.
    """

    watcher: ListWatcher

    def start(self) -> Self:
        """Start watching (returns at once; see `wait_synced`)."""
        self.watcher.start()
        return self

    def stop(self) -> None:
        """Stop watching and join the thread."""
        self.watcher.stop()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the first list has arrived (within `timeout` seconds)."""
        return self.watcher.wait_synced(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def first_attr(obj: Any, *names: str) -> Any:
    """The first of `names` that `obj` has (client versions name some fields differently:
    `pod_ips` in kubernetes>=34, `pod_i_ps` before)."""
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None
