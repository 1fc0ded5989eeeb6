"""The engine thread: the only thread that touches the device. It loops `scheduler.step()`
while there is work and sleeps on a condition otherwise; events go to each HTTP request's
asyncio queue through `loop.call_soon_threadsafe`, so the event loop never waits on the device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Sequence

from ..sampling import SamplingParams
from ..scheduler import Event, QueueFull, Request, Scheduler

log = logging.getLogger(__name__)

# Schedulers with a running engine thread: a second thread stepping one would corrupt it.
_driven: weakref.WeakSet[Scheduler] = weakref.WeakSet()


class EngineFailure(RuntimeError):
    """The engine raised while a request was in flight; the request cannot complete."""


@dataclasses.dataclass
class Submission:
    """The engine requests behind one HTTP request (n choices × prompts). Their outputs arrive
    on `queue` as (choice index, Event or EngineFailure)."""

    requests: list[Request]
    queue: asyncio.Queue[tuple[int, Event | EngineFailure]]
    worker: "EngineWorker"

    def cancel(self) -> None:
        """Free the slots of unfinished requests (the client went away); a no-op once all are done."""
        for r in self.requests:
            if not r.done:
                self.worker.cancel(r)


class EngineWorker:
    def __init__(self, scheduler: Scheduler, observe: Callable[[Request, Event], None] | None = None):
        self.scheduler = scheduler
        self._observe = observe
        self._cond = threading.Condition()
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._live: dict[str, tuple[Request, Callable[[Event | EngineFailure], None]]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None  # set when a step fails, cleared by the next good one
        self._busy_since: float | None = None  # when the device work now running began

    # ---- lifecycle ----
    def start(self) -> None:
        if self._thread is not None:
            return
        if self.scheduler in _driven:
            raise RuntimeError("this LLM's scheduler is already driven by another running server")
        _driven.add(self.scheduler)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llama-jax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            _driven.discard(self.scheduler)
        self._fail_all("the server is shutting down")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy_for(self) -> float:
        """Seconds the current step (or call) has been running; 0 between steps. One that never
        ends (a hung device, a collective waiting on a lost process) shows here."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    # ---- called from the event loop ----
    def submit(self, jobs: Sequence[tuple[list[int], SamplingParams]], loop: asyncio.AbstractEventLoop,
               adapter: int = 0, waiting_adapter: Any = None, priority: int = 0) -> Submission:
        """Queue one engine request per job (all with LoRA adapter slot `adapter`, or the adapter
        `waiting_adapter` that waits for a slot: LLM.resolve_adapter), all or none: raises
        QueueFull (nothing queued) or ValueError (a prompt the scheduler refuses)."""
        queue: asyncio.Queue = asyncio.Queue()
        requests: list[Request] = []
        with self._cond:
            sched = self.scheduler
            if sched.queue_depth + len(jobs) > sched.max_queue:
                raise QueueFull(f"the queue holds {sched.queue_depth} of {sched.max_queue} requests")
            try:
                for index, (ids, sampling) in enumerate(jobs):
                    # Registered before it is queued: the engine thread may admit, finish and
                    # report it before add() returns.
                    req = Request(ids, sampling, on_event=self._on_event, id=f"req-{uuid.uuid4().hex}",
                                  adapter=adapter, lora=waiting_adapter, priority=priority)
                    self._live[req.id] = (req, _deliverer(loop, queue, index))
                    requests.append(req)
                    sched.add(req)
            except (QueueFull, ValueError):
                for req in requests:
                    self._live.pop(req.id, None)
                    self.cancel(req)
                raise
            self._cond.notify()
        return Submission(requests, queue, self)

    def cancel(self, request: Request) -> None:
        self.scheduler.cancel(request)
        with self._cond:
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between steps (device work outside the scheduler)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    # ---- the engine thread ----
    def _run(self) -> None:
        sched = self.scheduler
        while True:
            with self._cond:
                while not (self._stopping or self._calls or sched.has_work()):
                    self._cond.wait()
                if self._stopping:
                    return
                calls, self._calls = self._calls, []
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    self._busy_since = time.monotonic()
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the caller, which reports it
                        future.set_exception(e)
                    finally:
                        self._busy_since = None
            if sched.has_work():
                self._busy_since = time.monotonic()
                try:
                    sched.step()
                    self.last_error = None
                except Exception as e:
                    log.exception("engine step failed; failing the requests in flight")
                    self.last_error = f"{type(e).__name__}: {e}"
                    self._fail_all("the engine failed while running this request")
                finally:
                    self._busy_since = None

    def _on_event(self, event: Event) -> None:
        entry = self._live.get(event.request_id)
        if entry is None:
            return
        req, deliver = entry
        if event.finish_reason is not None:
            self._live.pop(event.request_id, None)
        if self._observe is not None:
            self._observe(req, event)
        deliver(event)

    def _fail_all(self, message: str) -> None:
        for rid, (req, deliver) in list(self._live.items()):
            self._live.pop(rid, None)
            self.scheduler.cancel(req)
            deliver(EngineFailure(message))


def _deliverer(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> Callable[[Any], None]:
    def deliver(item: Event | EngineFailure) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, item))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    return deliver
