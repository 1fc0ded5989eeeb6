"""Multi-host: two processes x 4 CPU devices on 127.0.0.1 restore a checkpoint into shardings that
span both and generate the same greedy tokens as one process with 8 devices (tp=8 and dp=2,tp=4);
and the start-up settings (arguments, environment, flags) of llama_jax.distributed."""

from __future__ import annotations

import argparse
import socket

import pytest
from test_sharding import finish_check, start_check

from llama_jax import distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path) -> None:
    reference = finish_check(start_check(["multihost-reference", str(tmp_path)]))
    coordinator = f"127.0.0.1:{_free_port()}"
    workers = [start_check(["multihost-worker", str(tmp_path), coordinator, str(i)], devices=4) for i in range(2)]
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
