"""Checks that need several (simulated CPU) devices. tests/test_sharding.py and tests/test_multihost.py
run them in subprocesses: XLA reads the device count when JAX starts, and the other test modules
want the default single device. Each run bundles many checks so that JAX starts only a few times.

    python tests/sharding_checks.py equivalence PRESET                  (8 devices)
    python tests/sharding_checks.py restore DIR                         (8 devices)
    python tests/sharding_checks.py multihost-reference DIR             (8 devices, one process)
    python tests/sharding_checks.py multihost-worker DIR COORDINATOR ID (4 devices, each of 2 processes)

Each prints `RESULT <json>` as its last line; a failed check raises (non-zero exit).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llama_jax import checkpoint  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402
from llama_jax.engine import Engine, PrefillJob  # noqa: E402
from llama_jax.model import KVCache, Llama, Params, forward  # noqa: E402
from llama_jax.sampling import SamplingParams  # noqa: E402
from llama_jax.sharding import ModelShardings, make_mesh  # noqa: E402
from llama_jax.speculative import NgramSpeculation  # noqa: E402
from llama_jax.tokenizer import llama3_tokenizer  # noqa: E402

MESHES = ("tp=1", "tp=2", "tp=4", "tp=8", "dp=2,tp=4", "dp=4,tp=2")
HLO_MESHES = ("tp=8", "dp=2,tp=4")  # decode steps whose compiled HLO is inspected
MULTIHOST_MESHES = ("tp=8", "dp=2,tp=4")
MAX_SLOTS, MAX_SEQ, DECODES = 4, 128, 3  # one KV block: dp=1 meshes decode over blocks
PROMPT_LENGTHS = (5, 11, 3)  # three of the four slots busy, one idle
COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?)\s+(all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(")
SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def random_params(config: LlamaConfig) -> Params:
    return jax.jit(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=jnp.float32).params())()


def prompts(config: LlamaConfig) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def make_engine(config: LlamaConfig, params: Params, shardings: ModelShardings | None) -> Engine:
    return Engine(config, params, max_slots=MAX_SLOTS, max_seq_len=MAX_SEQ, prefill_buckets=(16,),
                  decode_steps=4, shardings=shardings, speculation=NgramSpeculation(num_tokens=2))


def allowed_mask(config: LlamaConfig) -> np.ndarray:
    """A random half of the vocabulary, as Engine.constrain's bitmask words."""
    keep = np.random.default_rng(2).random(config.vocab_size) < 0.5
    return np.packbits(np.pad(keep, (0, -config.vocab_size % 32)), bitorder="little").view(np.int32)


def greedy(engine: Engine, config: LlamaConfig) -> list[list[int]]:
    """First tokens from prefill, then DECODES decode calls, slots 0 and 2 constrained to
    allowed_mask (structured output's path), then (with speculation, as make_engine's) a
    verify of a draft for slot 1, slot 2 preempted and resumed, one more decode; tokens per busy
    slot; then slot 3's first token."""
    out = [[int(engine.prefill(s, p, SamplingParams.greedy(), 0).tokens[0, 0])] for s, p in enumerate(prompts(config))]
    engine.constrain([0, 2], np.stack([allowed_mask(config)] * 2))
    for _ in range(DECODES):
        step = engine.decode().tokens
        for s in range(len(out)):
            out[s] += step[:, s].tolist()
    if engine.speculation is not None:
        step = engine.verify({1: out[1][-2:]})  # kept as far as the model says it again
        for s in range(len(out)):
            out[s] += step.tokens[: step.counts[s], s].tolist()
    keep = np.unpackbits(allowed_mask(config).view(np.uint8), bitorder="little").astype(bool)
    assert all(keep[t] for s in (0, 2) for t in out[s][1:]), "a constrained slot sampled a banned token"
    # Slot 2 preempted and resumed (priority scheduling's path): its prompt and output but the
    # last prefilled again, the output restored to its sampler row, one more decode for all.
    prompt = prompts(config)[2]
    engine.release(2)
    engine.prefill_many([PrefillJob(2, prompt + out[2][:-1], SamplingParams.greedy(), 0)])
    engine.resume(2, prompt, out[2])
    step = engine.decode().tokens
    for s in range(len(out)):
        out[s] += step[:, s].tolist()
    # Slot 3 takes the start of slot 1's prompt copied from its rows (prefix reuse), where slots
    # are not split over dp; elsewhere it prefills the whole prompt. Either way: the same token.
    fork, shared = prompts(config)[1][:8] + [1, 2], 8 if engine.can_copy_prefix else 0
    if shared:
        engine.copy_prefix(1, 3, shared)
    out.append(engine.prefill_many([PrefillJob(3, fork, SamplingParams.greedy(), 0, cached=shared)]).tokens[0].tolist())
    return out


def check_shardings(tree: Any, targets: Any, what: str) -> None:
    for (path, arr), target in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(targets), strict=True):
        assert arr.sharding == target, f"{what}{jax.tree_util.keystr(path)}: {arr.sharding} != {target}"


def weight_gathers(hlo: str, config: LlamaConfig, params: Params, cache: KVCache) -> list[str]:
    """Collectives other than all-reduce that move something weight- or cache-sized: their result
    has the shape of a weight, one layer of it, the cache or one layer of it, or more elements
    than twice the (slots, vocab) logits, the largest activation a decode step may gather."""
    big = {tuple(a.shape) for a in jax.tree.leaves(params)} | {tuple(a.shape[1:]) for a in jax.tree.leaves(params)}
    big |= {tuple(cache.k.shape), tuple(cache.k.shape[1:])}
    limit = 2 * MAX_SLOTS * config.vocab_size  # the top-p sort gathers (key, index) pairs of the logits
    bad = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if not m:
            continue
        for dims in SHAPE.findall(m[1]):
            shape = tuple(int(d) for d in dims.split(",") if d)
            if shape in big or int(np.prod(shape)) > limit:
                bad.append(line.strip()[:200])
    return bad


def equivalence(preset: str) -> dict[str, Any]:
    """Logits and greedy generations on every mesh equal the single-device ones; decode compiles
    once and keeps the cache sharding; decode HLO gathers no weight."""
    config = LlamaConfig.from_preset(preset)
    params = random_params(config)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (MAX_SLOTS, 12)).astype(np.int32)
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape)

    def logits_fn(p: Params, t: jax.Array, pos: jax.Array) -> jax.Array:
        return forward(p, config, t, pos, KVCache.zeros(config, t.shape[0], t.shape[1], jnp.float32))[0]

    ref_logits = np.asarray(jax.jit(logits_fn)(params, tokens, positions))
    ref_tokens = greedy(make_engine(config, params, None), config)
    results: dict[str, Any] = {"reference": ref_tokens}
    for spec in MESHES:
        sh = ModelShardings(config, make_mesh(spec, allow_subset=True))
        sharded = jax.device_put(params, sh.params)
        check_shardings(sharded, sh.params, f"{spec} params")
        rows = sh.batch()
        logits = jax.jit(logits_fn, in_shardings=(sh.params, rows, rows), out_shardings=rows)(sharded, tokens, positions)
        err = float(np.max(np.abs(np.asarray(logits) - ref_logits)))
        assert err < 1e-4, f"{spec}: logits differ from one device by {err}"

        engine = make_engine(config, sharded, sh)
        got = greedy(engine, config)
        assert got == ref_tokens, f"{spec}: greedy tokens {got} != single device {ref_tokens}"
        check_shardings(engine.cache, sh.cache, f"{spec} cache after decode")
        # Same window every call: one decode program, one prefill program, never recompiled.
        assert engine._decode._cache_size() == 1, f"{spec}: decode compiled {engine._decode._cache_size()} times"
        assert engine._prefill._cache_size() == 1, f"{spec}: prefill compiled {engine._prefill._cache_size()} times"
        entry: dict[str, Any] = {"logits_max_abs_err": err, "cache_spec": str(sh.cache.k.spec),
                                 "wq_spec": str(sh.params["layers"]["wq"].spec)}
        if spec in HLO_MESHES:
            lowered = engine.lower_decode()
            entry["block_decode"] = lowered.args_info[0][5].shape != (0,)  # no block: the dense window
            hlo = lowered.compile().as_text()
            bad = weight_gathers(hlo, config, params, engine.cache)
            assert not bad, f"{spec}: decode step moves weights or cache:\n" + "\n".join(bad)
            entry["all_reduces"] = len(re.findall(r"\ball-reduce(-start)?\(", hlo))
            assert entry["all_reduces"] > 0, f"{spec}: no all-reduce: is the step sharded at all?"
        results[spec] = entry
    return results


def write_checkpoint(path: Path, config: LlamaConfig, params: Params, dtype: str) -> None:
    host = jax.device_get(params)
    with checkpoint.CheckpointWriter(path, config, dtype, "hf", overwrite=True) as w:
        w.write_globals({k: v for k, v in host.items() if k != "layers"})
        for i in range(config.n_layers):
            w.write_layer(i, {k: v[i] for k, v in host["layers"].items()})


def restore(directory: str) -> dict[str, Any]:
    """restore_params lands every array in its target sharding, cast on device."""
    config = LlamaConfig.from_preset("tiny")
    params = random_params(config)
    path = Path(directory) / "ckpt"
    write_checkpoint(path, config, params, "bfloat16")
    sh = ModelShardings(config, make_mesh("tp=8"))
    # Orbax must hand back device arrays, already sharded, in the stored dtype: the f32 cast then
    # runs on the devices, shard by shard. Nothing may come back to the host on the way.
    read: list[jax.Array] = []
    orbax_restore = checkpoint._restore

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = orbax_restore(*args, **kwargs)
        read.extend(out.values())
        return out

    checkpoint._restore = spy
    try:
        with jax.transfer_guard_device_to_host("disallow"):
            restored = checkpoint.restore_params(path, dtype="float32", shardings=sh.params, progress=False)
    finally:
        checkpoint._restore = orbax_restore
    assert len(read) == 3 + 9 * config.n_layers
    for arr in read:
        assert isinstance(arr, jax.Array) and arr.dtype == jnp.bfloat16, (type(arr), arr.dtype)
        assert isinstance(arr.sharding, jax.sharding.NamedSharding) and arr.sharding.mesh == sh.mesh
    check_shardings(restored, sh.params, "restored")
    for (path_, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(params)):
        assert got.dtype == jnp.float32, f"{jax.tree_util.keystr(path_)}: dtype {got.dtype}"
        for shard in got.addressable_shards:  # each device holds just its block
            assert shard.data.shape == got.sharding.shard_shape(got.shape)
        expect = np.asarray(want).astype(jnp.bfloat16).astype(np.float32)
        assert np.array_equal(np.asarray(got), expect), f"{jax.tree_util.keystr(path_)}: values differ"
    return {"arrays": len(jax.tree.leaves(restored)), "wq_spec": str(sh.params["layers"]["wq"].spec)}


MULTIHOST_PRESET = "tiny"  # 2 KV heads: at tp=8 the KV heads are split across the two processes


def completion_requests(config: LlamaConfig) -> list[dict[str, Any]]:
    """/v1/completions bodies that go through the scheduler, the engine thread and echo's prompt
    logits: two prompts greedy with echo and logprobs, then two seeded samples of one prompt."""
    ids = prompts(config)
    return [dict(model="m", prompt=ids[:2], max_tokens=6, temperature=0, echo=True, logprobs=1),
            dict(model="m", prompt=ids[2], max_tokens=6, temperature=1.0, n=2, seed=7)]


def completions(post: Any, config: LlamaConfig) -> list[dict[str, Any]]:
    """Text and token log-probabilities of each choice of `completion_requests`, sent with `post`
    (an HTTP client's post)."""
    out = []
    for body in completion_requests(config):
        r = post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out += [{"text": c["text"], "logprobs": (c["logprobs"] or {}).get("token_logprobs")}
                for c in r.json()["choices"]]
    return out


def serve(llm: Any) -> list[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from llama_jax.server import create_app

    with TestClient(create_app(llm, model_name="m")) as client:
        return completions(client.post, llm.config)


def serving_llm(config: LlamaConfig, params: Params, shardings: ModelShardings) -> Any:
    from llama_jax.api import LLM

    return LLM(config, params, llama3_tokenizer(), max_slots=MAX_SLOTS, max_seq_len=MAX_SEQ, decode_steps=4,
               shardings=shardings)


def multihost_reference(directory: str) -> dict[str, Any]:
    """One process, 8 devices: write the checkpoint both runs load, the greedy tokens, and the
    served completions (tp=8)."""
    config = LlamaConfig.from_preset(MULTIHOST_PRESET)
    write_checkpoint(Path(directory) / "ckpt", config, random_params(config), "float32")
    shutil.copy(llama3_tokenizer().path, Path(directory) / "ckpt" / "tokenizer.model")  # for scripts/serve.py
    out: dict[str, Any] = {}
    for spec in MULTIHOST_MESHES:
        sh = ModelShardings(config, make_mesh(spec))
        params = checkpoint.restore_params(Path(directory) / "ckpt", shardings=sh.params, progress=False)
        out[spec] = greedy(make_engine(config, params, sh), config)
        if spec == "tp=8":
            out["served"] = serve(serving_llm(config, params, sh))
    return out


def multihost_worker(directory: str, coordinator: str, process_id: str) -> dict[str, Any]:
    """One of two processes with 4 devices each: the same load and generation over all 8."""
    from llama_jax import distributed, lockstep

    assert distributed.initialize(coordinator, 2, int(process_id))
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    config = checkpoint.read_config(Path(directory) / "ckpt")
    out = {}
    for spec in MULTIHOST_MESHES:
        sh = ModelShardings(config, make_mesh(spec))
        params = checkpoint.restore_params(Path(directory) / "ckpt", shardings=sh.params, progress=False)
        check_shardings(params, sh.params, f"{spec} restored")
        for arr in jax.tree.leaves(params):  # this process holds only its own devices' shards
            assert len(arr.addressable_shards) == 4
        out[spec] = greedy(make_engine(config, params, sh), config)
        if spec == "tp=8":  # the HTTP server on process 0, process 1 following its device calls
            llm = serving_llm(config, params, sh)
            if jax.process_index() == 0:
                leader = lockstep.lead(llm)
                out["served"] = serve(leader.llm)
                leader.close()
                out["calls"] = leader.calls
            else:
                out["calls"] = lockstep.follow(llm)
    return out


CHECKS = {"equivalence": equivalence, "restore": restore, "multihost-reference": multihost_reference,
          "multihost-worker": multihost_worker}

if __name__ == "__main__":
    result = CHECKS[sys.argv[1]](*sys.argv[2:])
    print("RESULT " + json.dumps(result), flush=True)
