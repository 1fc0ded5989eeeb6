"""Peak host memory of the HF converter on a synthetic multi-GB checkpoint.

Builds a random Hugging Face Llama checkpoint (bfloat16 safetensors, sharded, each shard written
tensor by tensor so building it stays small too), converts it with `python -m convert hf` in a
subprocess, polls the subprocess's resident set size, and prints the checkpoint size next to the
peak RSS. The baseline (the RSS of a process that only imports the converter's modules) is
measured the same way. Results go to benchmarks/convert_rss.json.

    python scripts/measure_convert_rss.py [--layers 16 --dim 2048 --ffn 8192 --vocab 32000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


def hf_tensor_shapes(a: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    dh = a.dim // a.heads
    shapes = {"model.embed_tokens.weight": (a.vocab, a.dim)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (a.dim,),
            p + "self_attn.q_proj.weight": (a.heads * dh, a.dim),
            p + "self_attn.k_proj.weight": (a.kv_heads * dh, a.dim),
            p + "self_attn.v_proj.weight": (a.kv_heads * dh, a.dim),
            p + "self_attn.o_proj.weight": (a.dim, a.heads * dh),
            p + "post_attention_layernorm.weight": (a.dim,),
            p + "mlp.gate_proj.weight": (a.ffn, a.dim),
            p + "mlp.up_proj.weight": (a.ffn, a.dim),
            p + "mlp.down_proj.weight": (a.dim, a.ffn),
        }
    shapes |= {"model.norm.weight": (a.dim,), "lm_head.weight": (a.vocab, a.dim)}
    return shapes


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """The safetensors layout (u64 header size, JSON header, raw little-endian data), with each
    tensor generated and written on its own."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in shapes.items():
            scale = 1.0 if name.endswith("norm.weight") else 0.02
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
            f.write(x.astype(ml_dtypes.bfloat16).tobytes())
            del x


def build_source(dst: Path, a: argparse.Namespace) -> int:
    dst.mkdir(parents=True)
    shapes = hf_tensor_shapes(a)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > a.shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(dst / file, shard, rng)
        weight_map |= {name: file for name in shard}
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab, "hidden_size": a.dim,
        "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    (dst / "config.json").write_text(json.dumps(config))
    return total


def rss_anon(pid: int) -> int:
    """Anonymous resident memory (Linux): RSS without file-backed pages such as memory-mapped
    source files, which the kernel can drop at any time."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss(cmd: list[str], interval: float = 0.01) -> tuple[int, int, float, int]:
    """(peak RSS, peak anonymous RSS, wall seconds, exit code) of a subprocess, polled."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    ps = psutil.Process(proc.pid)
    peak = peak_anon = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
            peak_anon = max(peak_anon, rss_anon(proc.pid))
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            break
        time.sleep(interval)
    return peak, peak_anon, time.perf_counter() - start, proc.wait()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-bytes", type=int, default=700 * 2**20, help="safetensors shard size")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="checkpoint dtype")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary directory)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "convert_rss.json")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="convert-rss-", dir=a.workdir))
    try:
        t0 = time.perf_counter()
        source_bytes = build_source(work / "hf", a)
        print(f"built a {source_bytes / 1e9:.2f} GB synthetic HF checkpoint in {time.perf_counter() - t0:.0f} s")
        baseline, _, _, _ = peak_rss([sys.executable, "-c", "import convert.hf, torch, safetensors, "
                                   "orbax.checkpoint, jax, llama_jax.checkpoint"])
        peak, peak_anon, seconds, rc = peak_rss([sys.executable, "-m", "convert", "hf", str(work / "hf"), str(work / "ckpt"),
                                      "--dtype", a.dtype, "--no-progress"])
        if rc != 0:
            sys.exit(f"the conversion failed with exit code {rc}")
        ru_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        ckpt_bytes = dir_bytes(work / "ckpt")
        shapes = hf_tensor_shapes(a)
        itemsize = 2 if a.dtype == "bfloat16" else 4
        largest = max(int(np.prod(s)) for s in shapes.values()) * itemsize
        layer = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith("model.layers.0.")) * itemsize
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPU cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}",
        "model": {"layers": a.layers, "dim": a.dim, "heads": a.heads, "kv_heads": a.kv_heads, "ffn": a.ffn,
                  "vocab": a.vocab, "source_dtype": "bfloat16", "checkpoint_dtype": a.dtype},
        "source_bytes": source_bytes,
        "checkpoint_bytes": ckpt_bytes,
        "largest_tensor_bytes": largest,
        "layer_bytes": layer,
        "import_baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_rss_above_baseline_bytes": peak - baseline,
        "peak_rss_anon_bytes": peak_anon,
        "ru_maxrss_children_bytes": ru_maxrss,
        "convert_seconds": round(seconds, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    mb = 2**20
    print(f"{'checkpoint size':<34}{ckpt_bytes / mb:>9.0f} MiB")
    print(f"{'largest tensor / one layer':<34}{largest / mb:>9.0f} MiB / {layer / mb:.0f} MiB")
    print(f"{'import baseline RSS':<34}{baseline / mb:>9.0f} MiB")
    print(f"{'converter peak RSS (psutil)':<34}{peak / mb:>9.0f} MiB  ({(peak - baseline) / mb:.0f} MiB above baseline)")
    print(f"{'converter peak anonymous RSS':<34}{peak_anon / mb:>9.0f} MiB  (without mapped source pages)")
    print(f"{'converter peak RSS (ru_maxrss)':<34}{ru_maxrss / mb:>9.0f} MiB")
    print(f"{'conversion time':<34}{seconds:>9.1f} s")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
