"""Sharding on 8 simulated CPU devices: meshes, the logical-axis table, sharded logits and greedy
generations equal to one device's, no weight movement in the decode step, no recompiles, and
checkpoint restore straight into the target shardings.

The multi-device checks live in tests/sharding_checks.py and run in subprocesses (XLA must see
the device count before JAX starts); they start together and each test waits for its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from llama_jax.sharding import MeshError, make_mesh, parse_mesh_spec

CHECKS = Path(__file__).with_name("sharding_checks.py")
# O0 code generation: these programs are tiny and compiling dominates the run time.
XLA_FLAGS = "--xla_force_host_platform_device_count={n} --xla_backend_optimization_level=0"


def start_check(args: list[str], devices: int = 8, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "XLA_FLAGS": XLA_FLAGS.format(n=devices), "JAX_PLATFORMS": "cpu", **env}
    return subprocess.Popen([sys.executable, str(CHECKS), *args], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_check(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args[1:]))} failed:\n{out[-6000:]}"
    return json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.Popen]:
    """All multi-device runs of this module, started at once."""
    procs = {
        "tiny": start_check(["equivalence", "tiny"]),
        "tiny-8kv": start_check(["equivalence", "tiny-8kv"]),
        "restore": start_check(["restore", str(tmp_path_factory.mktemp("restore"))]),
    }
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def test_parse_mesh_spec() -> None:
    assert parse_mesh_spec("tp=8") == {"dp": 1, "tp": 8}
    assert parse_mesh_spec("dp=2, tp=4") == {"dp": 2, "tp": 4}
    assert parse_mesh_spec({"dp": 4}) == {"dp": 4, "tp": 1}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("pp=2", "unknown axis 'pp'"),
        ("tp=2,tp=4", "given twice"),
        ("tp=0", "positive integer"),
        ("tp:8", "not of the form axis=size"),
        ("tp=8", "needs 8 devices but 1 are available"),
    ],
)
def test_make_mesh_errors(spec: str, message: str) -> None:
    with pytest.raises(MeshError, match=message):
        make_mesh(spec, jax.devices()[:1])


def test_make_mesh_subset() -> None:
    devices = jax.devices()[:1]
    mesh = make_mesh("tp=1", devices)
    assert dict(mesh.shape) == {"dp": 1, "tp": 1}
    with pytest.raises(MeshError, match="allow_subset"):
        make_mesh("tp=1", devices + [object()])
    assert make_mesh("tp=1", devices + [object()], allow_subset=True).devices.size == 1


@pytest.mark.parametrize("preset", ["tiny", "tiny-8kv"])
def test_sharded_equals_single_device(checks: dict, preset: str) -> None:
    """tp in {1, 2, 4, 8}, dp x tp in {2x4, 4x2}: logits within 1e-4, identical greedy tokens,
    decode and prefill each compiled once, cache sharding kept, no weight gathered in decode."""
    result = finish_check(checks[preset])
    for spec in ("tp=1", "tp=2", "tp=4", "tp=8", "dp=2,tp=4", "dp=4,tp=2"):
        assert spec in result
    assert result["tp=8"]["all_reduces"] > 0 and result["dp=2,tp=4"]["all_reduces"] > 0
    # tp alone decodes over each row's KV blocks; with slots split over dp, over the dense window
    assert result["tp=8"]["block_decode"] and not result["dp=2,tp=4"]["block_decode"]
    if preset == "tiny":  # 2 KV heads, 4 query heads: from tp=4 on, each KV head is held by tp/2 devices
        assert result["tp=8"]["cache_spec"] == "P(None, None, None, 'tp_kv')"
        assert result["tp=4"]["wq_spec"] == "P(None, None, ('tp_kv', 'tp_rep'))"
        assert result["tp=8"]["wq_spec"] == "P(None, None, 'tp_kv')"  # 4 heads cannot split 8 ways
    else:
        assert result["tp=8"]["cache_spec"] == "P(None, None, None, 'tp_kv')"
        assert result["dp=2,tp=4"]["cache_spec"] == "P(None, 'dp', None, 'tp_kv')"
        assert result["tp=8"]["wq_spec"] == "P(None, None, 'tp_kv')"


def test_restore_into_shardings(checks: dict) -> None:
    """restore_params: every array lands in its target sharding, float32 cast on device."""
    result = finish_check(checks["restore"])
    assert result["arrays"] == 12
