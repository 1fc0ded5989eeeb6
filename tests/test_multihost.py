"""Multi-host: two processes x 4 CPU devices on 127.0.0.1 restore a checkpoint into shardings that
span both and generate the same greedy tokens as one process with 8 devices (tp=8 and dp=2,tp=4),
and serve the same completions (process 0 serving, process 1 following: llama_jax/lockstep.py,
in-process and through scripts/serve.py); and the start-up settings of llama_jax.distributed."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sharding_checks import completions
from test_sharding import XLA_FLAGS, finish_check, start_check

from llama_jax import checkpoint, distributed

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One process with 8 devices: the checkpoint (with a tokenizer) and what it generates."""
    directory = tmp_path_factory.mktemp("multihost")
    return directory, finish_check(start_check(["multihost-reference", str(directory)]))


def test_two_processes_equal_one(reference: tuple[Path, dict]) -> None:
    directory, reference = reference
    coordinator = f"127.0.0.1:{_free_port()}"
    workers = [start_check(["multihost-worker", str(directory), coordinator, str(i)], devices=4) for i in range(2)]
    try:
        results = [finish_check(w, timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for spec in ("tp=8", "dp=2,tp=4"):
        for i, result in enumerate(results):
            assert result[spec] == reference[spec], f"process {i}, mesh {spec}"
    # Served by process 0 while process 1 followed (llama_jax/lockstep.py): the same completions
    # as one process, and every device call made on both.
    assert_same_completions(results[0]["served"], reference["served"])
    assert results[0]["calls"] == results[1]["calls"] > 0


def assert_same_completions(served: list[dict], expected: list[dict]) -> None:
    assert [c["text"] for c in served] == [c["text"] for c in expected]
    for got, want in zip(served, expected):
        assert (got["logprobs"] is None) == (want["logprobs"] is None)
        if want["logprobs"] is not None:
            assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-4)


def test_serve_script_on_two_processes(reference: tuple[Path, dict]) -> None:
    """scripts/serve.py started once per process: process 0 answers over HTTP what one process
    answers, and when it stops, process 1 returns too."""
    directory, reference = reference
    coordinator, port = f"127.0.0.1:{_free_port()}", _free_port()
    env = {**os.environ, "XLA_FLAGS": XLA_FLAGS.format(n=4), "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "serve.py"), "--ckpt", str(directory / "ckpt"), "--port", str(port),
             "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i), "--dtype", "float32",
             "--max-slots", "4", "--max-seq-len", "128", "--decode-steps", "4", "--model-name", "m", "--no-warmup",
             "--log-level", "warning"],
            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 300
            while True:
                assert all(p.poll() is None for p in procs), "a serve.py process exited while starting"
                assert time.monotonic() < deadline, "serve.py did not start within 300 s"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            served = completions(client.post, checkpoint.read_config(directory / "ckpt"))
        procs[0].send_signal(signal.SIGINT)  # uvicorn stops, then releases process 1
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n{outputs[i][-4000:]}"
    assert_same_completions(served, reference["served"])


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_is_a_no_op(no_env: pytest.MonkeyPatch) -> None:
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert distributed.initialize_from(None) is False
    assert distributed.initialize_from(False) is False
    assert distributed.initialize_from({"num_processes": 1}) is False
    no_env.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert distributed.initialize() is False
    assert distributed.initialize_from(True) is False


@pytest.mark.parametrize(
    "env, kwargs, message",
    [
        ({}, {"num_processes": 2, "process_id": 0}, "coordinator"),
        ({}, {"coordinator": "host", "num_processes": 2, "process_id": 0}, "host:port"),
        ({}, {"coordinator": "h:1", "num_processes": 2, "process_id": 2}, r"process_id must be in \[0, 2\)"),
        ({}, {"coordinator": "h:1", "num_processes": 2}, "process_id"),
        ({"LLAMA_JAX_NUM_PROCESSES": "two"}, {}, "must be an integer"),
        ({"LLAMA_JAX_NUM_PROCESSES": "2", "LLAMA_JAX_PROCESS_ID": "0"}, {}, "coordinator"),
    ],
)
def test_bad_settings(no_env: pytest.MonkeyPatch, env: dict, kwargs: dict, message: str) -> None:
    for k, v in env.items():
        no_env.setenv(k, v)
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(**kwargs)


def test_unknown_setting() -> None:
    with pytest.raises(distributed.DistributedError, match="unknown"):
        distributed.initialize_from({"rank": 0})


def test_flags(no_env: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args(["--coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:1234", 2, 1)
    assert distributed.initialize_from_args(parser.parse_args([])) is False


def test_lockstep_in_one_process() -> None:
    """With no other process, `lead` still counts the device calls it would send (generation and
    a prompt's logits) and leaves reads local; after `close` a device call is refused."""
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax import lockstep
    from llama_jax.api import LLM
    from llama_jax.config import LlamaConfig
    from llama_jax.model import Llama
    from llama_jax.tokenizer import llama3_tokenizer

    config = LlamaConfig.from_preset("tiny")
    llm = LLM(config, Llama(config, rngs=nnx.Rngs(0), dtype=jnp.float32).params(), llama3_tokenizer(),
              max_slots=2, max_seq_len=64, decode_steps=4)
    with pytest.raises(lockstep.LockstepError, match="process 0 leads"):
        lockstep.follow(llm)
    expected = llm.generate([5, 6, 7], max_tokens=6, temperature=0).token_ids
    leader = lockstep.lead(llm)
    served = leader.llm
    assert served.generate([5, 6, 7], max_tokens=6, temperature=0).token_ids == expected
    assert leader.calls >= 3  # a prefill, at least one decode, a release
    before = leader.calls
    assert served.engine.free_slots() == [0, 1] and leader.calls == before  # a read: not sent
    served.logits([[5, 6, 7]])
    assert leader.calls == before + 1
    leader.close()
    with pytest.raises(lockstep.LockstepError, match="released"):
        served.logits([[5, 6, 7]])


def test_a_follower_gone_away_fails_the_next_device_call() -> None:
    """A follower that exited (its end of the connection closed) makes the next mirrored call
    fail at once, before it runs on process 0's devices, instead of hanging in a collective."""
    from multiprocessing import Pipe
    from types import SimpleNamespace

    from llama_jax import lockstep

    ran = []
    engine = SimpleNamespace(decode=lambda: ran.append("decode"), free_slots=lambda: [0])
    ours, theirs = Pipe()
    leader = lockstep.Leader(SimpleNamespace(engine=engine, scheduler=None), [ours])
    leader.llm.engine.decode()
    assert theirs.recv() == ("engine.decode", (), {}) and ran == ["decode"]
    assert leader.problem() is None
    theirs.close()
    assert leader.llm.engine.free_slots() == [0]  # reads stay local
    with pytest.raises(lockstep.LockstepError, match="process 1 has gone away"):
        leader.llm.engine.decode()
    assert ran == ["decode"]
    # What the server's /health reports (a call already running would wait on it forever).
    assert leader.problem() == "process 1 has gone away; restart the job"
    leader.close()
    assert leader.problem() is None
