"""Multi-host serving: process 0 runs the scheduler and the HTTP server, and every other process
repeats its device calls.

Each engine step is one program over the devices of all processes, so every process must make the
same calls with the same arguments in the same order. Process 0 calls `lead`, and serves the LLM
it returns: each call that runs on the devices (`MIRRORED`) is first sent, with its arguments, to
the other processes, which call `follow` and make the same calls until process 0 closes. Calls
that only read host state (free slots, cached prefixes, the tokenizer) stay local: each process's
host state is the same function of the calls made, seeds included (they travel as arguments).

The calls travel over TCP (`multiprocessing.connection`: pickled, and authenticated with a key
that process 0 hands out once through a device broadcast). Process 0 listens on all interfaces
on `port` (default: any free one) and the others connect to the host of the job's coordinator,
which process 0 runs.
"""

from __future__ import annotations

import logging
import secrets
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Callable

import jax
import numpy as np

log = logging.getLogger(__name__)

# Calls that run programs over the devices (state-changing engine calls; the full-sequence
# logits of a prompt, which /v1/completions uses for echo with logprobs).
ENGINE_CALLS = ("prefill", "prefill_many", "prefill_next", "copy_prefix", "constrain", "decode", "verify", "release",
                "resume", "reset")
LLM_CALLS = ("logits",)
MIRRORED = tuple(f"engine.{n}" for n in ENGINE_CALLS) + tuple(f"llm.{n}" for n in LLM_CALLS)
_KEY_BYTES = 32


class LockstepError(RuntimeError):
    """A process of the job can no longer be reached: the job cannot go on."""


class _Mirror:
    """`target` with the calls in `names` sent to the other processes first; everything else,
    attributes included, read from `target` itself."""

    def __init__(self, target: Any, prefix: str, names: tuple[str, ...], send: Callable[[tuple], None]):
        self._target, self._prefix, self._names, self._send = target, prefix, names, send

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name not in self._names:
            return value

        def mirrored(*args: Any, **kwargs: Any) -> Any:
            self._send((f"{self._prefix}.{name}", args, kwargs))
            return value(*args, **kwargs)

        return mirrored


class Leader:
    """Process 0's side: `llm` is the LLM to serve (or generate with); `close` releases the others."""

    def __init__(self, llm: Any, peers: list[Connection]):
        self._peers = peers
        self._closed = False
        self.calls = 0  # device calls sent
        # The LLM's own methods (generate, the scheduler's steps) reach the engine through these.
        llm.engine = _Mirror(llm.engine, "engine", ENGINE_CALLS, self._send)
        if llm.scheduler is not None:
            llm.scheduler.engine = llm.engine
        self.llm = _Mirror(llm, "llm", LLM_CALLS, self._send)

    def problem(self) -> str | None:
        """What stops the job, or None: a process that has gone away. A follower never writes
        after joining, so a readable connection is one it closed (it exited or died); the next
        device call is refused, but one already running waits for it in a collective forever, so
        the server's /health reports this (create_app's `health_checks`) for a supervisor to act."""
        for i, conn in enumerate(list(self._peers)):
            try:
                if conn.poll(0):
                    return f"process {i + 1} has gone away; restart the job"
            except (OSError, ValueError):  # closed meanwhile by close(): the job is ending anyway
                return None
        return None

    def _send(self, message: tuple) -> None:
        if self._closed:
            raise LockstepError("the other processes were released (Leader.close): no more device calls")
        problem = self.problem()
        if problem is not None:  # refused rather than left waiting for it in a collective forever
            raise LockstepError(problem)
        for i, conn in enumerate(self._peers):
            try:
                conn.send(message)
            except OSError as e:
                raise LockstepError(f"process {i + 1} can no longer be reached ({e}); restart the job") from e
        self.calls += 1

    def close(self) -> None:
        """Tell the other processes to return from `follow`."""
        for conn in self._peers:
            try:
                conn.send(None)
                conn.close()
            except OSError:
                pass
        self._peers, self._closed = [], True


def lead(llm: Any, port: int = 0) -> Leader:
    """On process 0 of a multi-process job, after loading: returns once every other process has
    called `follow`. Every process must reach `lead` or `follow` at the same point."""
    if jax.process_index() != 0:
        raise LockstepError(f"lead runs on process 0; process {jax.process_index()} calls follow")
    key = secrets.token_bytes(_KEY_BYTES)
    with Listener(("", port), authkey=key) as listener:
        _broadcast(listener.address[1], key)
        peers: dict[int, Connection] = {}
        while len(peers) < jax.process_count() - 1:
            conn = listener.accept()
            peers[conn.recv()] = conn
    log.info("lockstep: %d processes follow process 0", len(peers))
    return Leader(llm, [peers[i] for i in sorted(peers)])


def follow(llm: Any, host: str | None = None) -> int:
    """On every process but 0: make process 0's device calls until it closes; returns how many.
    `host`: where process 0 is reached (default: the coordinator's host)."""
    if jax.process_index() == 0:
        raise LockstepError("process 0 leads (lead); the other processes follow")
    port, key = _broadcast(0, b"")
    calls: dict[str, Callable[..., Any]] = {}
    for name in MIRRORED:
        owner, method = name.split(".")
        calls[name] = getattr(llm.engine if owner == "engine" else llm, method)
    n = 0
    with Client((host or _coordinator_host(), port), authkey=key) as conn:
        conn.send(jax.process_index())
        while True:
            try:
                message = conn.recv()
            except EOFError:
                raise LockstepError("process 0 went away without closing; its job is over") from None
            if message is None:
                return n
            name, args, kwargs = message
            n += 1
            try:
                calls[name](*args, **kwargs)
            except Exception:  # process 0 met the same error and reports it to its client
                log.exception("lockstep: %s failed (as on process 0)", name)


def _broadcast(port: int, key: bytes) -> tuple[int, bytes]:
    """Process 0's listening port and key, to every process (a collective: all call it)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(port.to_bytes(2, "big") + key.ljust(_KEY_BYTES, b"\0"), np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(data), np.uint8).tobytes()
    return int.from_bytes(out[:2], "big"), out[2:]


def _coordinator_host() -> str:
    # The address given to (or detected by) jax.distributed; JAX has no public accessor for it.
    from jax._src import distributed

    address = distributed.global_state.coordinator_address
    if not address:
        raise LockstepError("no coordinator address known; pass follow(..., host=) the host of process 0")
    return address.rsplit(":", 1)[0].strip("[]")
