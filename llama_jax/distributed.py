"""Multi-host start-up: join the processes of one job before JAX touches a device.

Every process runs the same program. After `initialize`, `jax.devices()` lists the devices of
all processes, so `make_mesh("tp=16")` spans two 8-GPU hosts; each process holds and reads from
the checkpoint only the shards of its own devices, and must make the same calls in the same order
(load, prefill, decode) since every step is one program over all devices.

Settings come from arguments, else from the environment:
    LLAMA_JAX_COORDINATOR     host:port of process 0 (every process gives the same)
    LLAMA_JAX_NUM_PROCESSES   number of processes
    LLAMA_JAX_PROCESS_ID      this process, 0 .. num_processes - 1
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Mapping

import jax

ENV_COORDINATOR = "LLAMA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LLAMA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLAMA_JAX_PROCESS_ID"


class DistributedError(ValueError):
    """Multi-process settings that cannot start a job."""


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join the job described by the arguments or the LLAMA_JAX_* variables.

    Returns False, doing nothing, for a single process (no setting, or num_processes 1), and
    True once joined (or when already joined). Must run before anything asks JAX for a device.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _int_setting("num_processes", num_processes, ENV_NUM_PROCESSES)
    process_id = _int_setting("process_id", process_id, ENV_PROCESS_ID)
    if num_processes is None or num_processes == 1:
        return False
    if num_processes < 1:
        raise DistributedError(f"num_processes must be >= 1, got {num_processes}")
    if coordinator is None:
        raise DistributedError(f"{num_processes} processes need a coordinator address ({ENV_COORDINATOR}=host:port)")
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):
        raise DistributedError(f"coordinator must be host:port, got {coordinator!r}")
    if process_id is None or not 0 <= process_id < num_processes:
        raise DistributedError(
            f"process_id must be in [0, {num_processes}) ({ENV_PROCESS_ID}), got {process_id!r}"
        )
    if jax.distributed.is_initialized():
        return True
    # CPU devices (tests, simulated clusters) need a cross-process collectives library; this
    # setting is read only by the CPU client, so it is harmless on GPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def initialize_from(distributed: bool | Mapping[str, Any] | None) -> bool:
    """The `distributed` argument of `llama_jax.load`: falsy: single process; True: the LLAMA_JAX_*
    variables, else JAX's own cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU);
    a mapping: keyword arguments of `initialize`."""
    if not distributed:
        return False
    if isinstance(distributed, Mapping):
        unknown = set(distributed) - {"coordinator", "num_processes", "process_id"}
        if unknown:
            raise DistributedError(f"unknown distributed setting(s) {sorted(unknown)}")
        return initialize(**distributed)
    if os.environ.get(ENV_NUM_PROCESSES):
        return initialize()
    if not jax.distributed.is_initialized():
        jax.distributed.initialize()  # auto-detection; raises if no cluster is found
    return True


def add_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--coordinator / --num-processes / --process-id for scripts; pass the parsed namespace to
    `initialize_from_args`."""
    group = parser.add_argument_group("multi-host", "run one process per host; all give the same coordinator")
    group.add_argument("--coordinator", default=None, help=f"host:port of process 0 (default: ${ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, default=None, help=f"processes in the job (default: ${ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", type=int, default=None, help=f"this process's index (default: ${ENV_PROCESS_ID})")
    return group


def initialize_from_args(args: argparse.Namespace) -> bool:
    return initialize(args.coordinator, args.num_processes, args.process_id)


def _int_setting(name: str, value: int | None, env: str) -> int | None:
    if value is not None:
        return value
    text = os.environ.get(env)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{env} must be an integer ({name}), got {text!r}") from None
