"""Host memory of a sharded restore: does loading a checkpoint 8 ways ever hold the whole model
on the host?

    python scripts/measure_restore_rss.py [--dir /tmp/rss] [--keep]

Writes a synthetic bf16 checkpoint of about 1.5 GB layer by layer (random layers, never the
whole model in memory), then, in a child process with 8 simulated CPU devices, restores it
with `checkpoint.restore_params` into tp=8 shardings and records peak RSS. On CPU the devices'
memory *is* host memory, so the restored arrays count in RSS too: the figure that matters is
the peak minus the RSS before the restore minus the bytes held as device arrays, i.e. what
the restore needed on top of its result. As a ceiling, a second child does the naive load:
read every tensor to host numpy, then `jax.device_put` to the same shardings.
Prints a table and writes benchmarks/restore_rss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# ~1.53 GB in bf16: 10 layers of 63M parameters and a 32k x 2048 embedding and LM head.
CONFIG = dict(vocab_size=32_768, dim=2048, n_layers=10, n_heads=16, n_kv_heads=8, ffn_dim=8192, max_seq_len=4096)
MESH = "tp=8"


def write_checkpoint(path: Path, n_layers: int) -> int:
    """Random layers written one at a time; returns the bytes of tensor data (bf16)."""
    import numpy as np

    from llama_jax.checkpoint import CheckpointWriter, global_shapes, layer_shapes
    from llama_jax.config import LlamaConfig

    config = LlamaConfig(**{**CONFIG, "n_layers": n_layers})
    rng = np.random.default_rng(0)
    total = 0

    def rand(shapes: dict) -> dict:
        nonlocal total
        total += sum(int(np.prod(s)) * 2 for s in shapes.values())
        return {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}

    with CheckpointWriter(path, config, "bfloat16", "hf", overwrite=True) as w:
        w.write_globals(rand(global_shapes(config)))
        for i in range(config.n_layers):
            w.write_layer(i, rand(layer_shapes(config)))
    return total


def child(mode: str, path: str) -> dict:
    """Runs with 8 CPU devices: restore (or naive-load) and report RSS figures in bytes."""
    import psutil

    import jax

    from llama_jax import checkpoint
    from llama_jax.sharding import ModelShardings, make_mesh

    proc = psutil.Process()
    config = checkpoint.read_config(path)
    shardings = ModelShardings(config, make_mesh(MESH))
    jax.block_until_ready(jax.numpy.zeros(8))  # start the backend before the baseline
    before = proc.memory_info().rss
    start = time.perf_counter()
    if mode == "restore":
        params = checkpoint.restore_params(path, shardings=shardings.params, progress=False)
    else:
        import numpy as np

        host = checkpoint.read_globals(path)
        layers = [checkpoint.read_layer(path, i) for i in range(config.n_layers)]
        host["layers"] = {k: np.stack([layer[k] for layer in layers]) for k in layers[0]}
        del layers
        params = jax.device_put(host, shardings.params)
        del host
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    device = sum(s.data.nbytes for a in jax.tree.leaves(params) for s in a.addressable_shards)
    return {"rss_before": before, "rss_peak": peak, "rss_after": proc.memory_info().rss,
            "device_array_bytes": device, "seconds": seconds}


def run_child(mode: str, path: Path) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{mode} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    p.add_argument("--layers", type=int, default=CONFIG["n_layers"], help="layers of 126 MB (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "restore_rss.json")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    root = args.dir or Path(tempfile.mkdtemp(prefix="restore-rss-"))
    path = root / "ckpt"
    try:
        size = write_checkpoint(path, args.layers)
        on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        runs = {mode: run_child(mode, path) for mode in ("restore", "naive")}
    finally:
        if not args.keep:
            shutil.rmtree(root if args.dir is None else path, ignore_errors=True)

    gb = lambda n: f"{n / 1e9:7.3f}"  # noqa: E731
    print(f"checkpoint: {gb(size)} GB of bf16 tensors ({gb(on_disk)} GB on disk), restored {MESH} "
          f"on 8 simulated CPU devices (device memory is host memory here)")
    print(f"{'load':<10}{'RSS before':>12}{'peak':>10}{'device arrays':>15}{'peak - before - arrays':>24}"
          f"{'÷ checkpoint':>14}{'seconds':>9}")
    for mode, r in runs.items():
        extra = r["rss_peak"] - r["rss_before"] - r["device_array_bytes"]
        r["overhead"] = extra
        r["overhead_over_checkpoint"] = extra / size
        print(f"{mode:<10}{gb(r['rss_before']):>12}{gb(r['rss_peak']):>10}{gb(r['device_array_bytes']):>15}"
              f"{gb(extra):>24}{extra / size:>14.2f}{r['seconds']:>9.1f}")
    result = {"config": {**CONFIG, "n_layers": args.layers}, "mesh": MESH, "checkpoint_bytes": size, "checkpoint_bytes_on_disk": on_disk,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
