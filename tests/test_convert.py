"""The checkpoint format (llama_jax.checkpoint) and the converters (convert/): layouts, files,
streaming writes, and clear errors for bad input without a half-written destination."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from convert import ConvertError, convert
from llama_jax import checkpoint as ck
from llama_jax.config import LlamaConfig

REPO = Path(__file__).resolve().parents[1]
TINY = LlamaConfig.from_preset("tiny")  # GQA 4/2 heads, head_dim 16, untied, llama3 scaling


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def write_random(dst: Path, config: LlamaConfig = TINY, dtype: str = "float32", **kw: Any) -> Path:
    with ck.CheckpointWriter(dst, config, dtype, "hf", **kw) as w:
        w.write_globals(random_tensors(ck.global_shapes(config), 0))
        for i in range(config.n_layers):
            w.write_layer(i, random_tensors(ck.layer_shapes(config), i + 1))
    return dst


def only_entries(parent: Path) -> list[str]:
    """Everything in a directory: a failed write must leave no DST and no temporary directory."""
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "convert", *args, "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- the checkpoint format


def test_writer_roundtrip_files_and_bfloat16_rounding(tmp_path: Path) -> None:
    dst = write_random(tmp_path / "ckpt", dtype="bfloat16")
    assert ck.is_checkpoint(dst) and only_entries(tmp_path) == ["ckpt"]
    assert json.loads((dst / "llama_jax.json").read_text()) == {
        "format": "llama-jax", "version": 2, "dtype": "bfloat16", "n_layers": 2, "source": "hf"}
    assert ck.read_config(dst) == TINY
    layer = ck.read_layer(dst, 1)
    want = random_tensors(ck.layer_shapes(TINY), 2)
    assert set(layer) == set(ck.LAYER_KEYS)
    for k, v in layer.items():
        assert v.dtype == ml_dtypes.bfloat16 and v.shape == want[k].shape
        np.testing.assert_array_equal(v, want[k].astype(ml_dtypes.bfloat16))  # round to nearest even
    assert set(ck.read_globals(dst)) == {"embed", "norm", "lm_head"}


def test_writer_validates_names_and_shapes(tmp_path: Path) -> None:
    with pytest.raises(ck.CheckpointError, match="tensor wq has shape"):
        with ck.CheckpointWriter(tmp_path / "a", TINY, "float32", "hf") as w:
            bad = random_tensors(ck.layer_shapes(TINY), 0)
            bad["wq"] = bad["wq"].reshape(TINY.dim, -1)
            w.write_layer(0, bad)
    with pytest.raises(ck.CheckpointError, match="missing tensor.*w_up"):
        with ck.CheckpointWriter(tmp_path / "b", TINY, "float32", "hf") as w:
            t = random_tensors(ck.layer_shapes(TINY), 0)
            del t["w_up"]
            w.write_layer(0, t)
    tied = LlamaConfig.from_preset("tiny-mha-tied")
    with pytest.raises(ck.CheckpointError, match="unexpected tensor.*lm_head"):
        with ck.CheckpointWriter(tmp_path / "c", tied, "float32", "hf") as w:
            w.write_globals(random_tensors({**ck.global_shapes(tied), "lm_head": (tied.dim, tied.vocab_size)}, 0))
    assert only_entries(tmp_path) == []


def test_writer_incomplete_or_failing_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ck.CheckpointError, match="layer\\(s\\) 1 were never written"):
        with ck.CheckpointWriter(tmp_path / "ckpt", TINY, "float32", "hf") as w:
            w.write_globals(random_tensors(ck.global_shapes(TINY), 0))
            w.write_layer(0, random_tensors(ck.layer_shapes(TINY), 1))
    with pytest.raises(KeyboardInterrupt):
        with ck.CheckpointWriter(tmp_path / "ckpt", TINY, "float32", "hf") as w:
            w.write_globals(random_tensors(ck.global_shapes(TINY), 0))
            raise KeyboardInterrupt
    assert only_entries(tmp_path) == []


def test_writer_overwrite_rules(tmp_path: Path) -> None:
    dst = write_random(tmp_path / "ckpt")
    with pytest.raises(ck.CheckpointError, match="already exists"):
        write_random(dst)
    write_random(dst, dtype="bfloat16", overwrite=True)
    assert ck.read_metadata(dst)["dtype"] == "bfloat16" and only_entries(tmp_path) == ["ckpt"]
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ck.CheckpointError, match="not a llama-jax checkpoint; refusing"):
        write_random(other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


def test_reader_errors_name_path_and_tensor(tmp_path: Path) -> None:
    with pytest.raises(ck.CheckpointError, match="llama_jax.json: missing"):
        ck.read_config(tmp_path)
    dst = write_random(tmp_path / "ckpt")
    # The config disagrees with the stored shapes.
    cfg = json.loads((dst / "model_config.json").read_text())
    (dst / "model_config.json").write_text(json.dumps({**cfg, "ffn_dim": 96}))
    with pytest.raises(ck.CheckpointError, match=r"layer_00000: tensor w_gate has shape \(64, 128\), the config says \(64, 96\)"):
        ck.read_layer(dst, 0)
    (dst / "model_config.json").write_text(json.dumps(cfg))
    # Truncated tensor data.
    data = max((p for p in (dst / "params" / "layer_00001").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="layer_00001"):
        ck.read_layer(dst, 1)
    # A missing layer directory.
    import shutil

    shutil.rmtree(dst / "params" / "layer_00001")
    with pytest.raises(ck.CheckpointError, match="layer_00001: missing"):
        ck.restore_params(dst, progress=False)


def test_restore_params_stacks_layers_and_casts(tmp_path: Path) -> None:
    dst = write_random(tmp_path / "ckpt", dtype="bfloat16")
    params = ck.restore_params(dst, dtype="float32", progress=False)
    assert set(params) == {"embed", "norm", "lm_head", "layers"}
    for i in range(TINY.n_layers):
        layer = ck.read_layer(dst, i)
        for k, v in params["layers"].items():
            assert v.dtype == np.float32 and v.shape == (TINY.n_layers, *ck.layer_shapes(TINY)[k])
            np.testing.assert_array_equal(np.asarray(v[i]), layer[k].astype(np.float32))
    assert ck.restore_params(dst, progress=False)["embed"].dtype == ml_dtypes.bfloat16
    per_layer = ck.restore_params(dst, dtype="float32", progress=False, stacked=False)["layers"]
    assert len(per_layer) == TINY.n_layers
    for i, layer in enumerate(per_layer):
        for k, v in layer.items():
            np.testing.assert_array_equal(v, params["layers"][k][i])


def test_restore_params_with_shardings(tmp_path: Path) -> None:
    """On 8 simulated CPU devices (a fresh process: the device count is fixed at JAX start-up)."""
    dst = write_random(tmp_path / "ckpt", config=LlamaConfig.from_preset("tiny-8kv"))
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from llama_jax import checkpoint as ck
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "tp"))
        ns = lambda *spec: NamedSharding(mesh, P(*spec))
        layers = {{k: ns() for k in ck.LAYER_KEYS}}
        layers.update(wq=ns(None, None, "tp"), wk=ns(None, None, "tp"), wv=ns(None, None, "tp"),
                      wo=ns(None, "tp"), w_gate=ns(None, None, "tp"), w_up=ns(None, None, "tp"),
                      w_down=ns(None, "tp"))
        sh = {{"embed": ns("tp"), "norm": ns(), "lm_head": ns(None, "tp"), "layers": layers}}
        params = ck.restore_params({str(dst)!r}, shardings=sh, progress=False)
        assert params["layers"]["wq"].sharding == layers["wq"], params["layers"]["wq"].sharding
        assert params["embed"].sharding == sh["embed"]
        assert len(params["layers"]["wq"].addressable_shards) == 8
        for i in range(2):
            host = ck.read_layer({str(dst)!r}, i)
            for k in ck.LAYER_KEYS:
                np.testing.assert_array_equal(np.asarray(params["layers"][k][i]), host[k])
        print("ok")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ---------------------------------------------------------------- Hugging Face


def expected_internal(hf: dict[str, np.ndarray], cfg: LlamaConfig, i: int) -> dict[str, np.ndarray]:
    """The documented HF -> internal layout mapping."""
    p = f"model.layers.{i}."
    d, h, k, dh = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {
        "attn_norm": hf[p + "input_layernorm.weight"],
        "wq": hf[p + "self_attn.q_proj.weight"].T.reshape(d, h, dh),
        "wk": hf[p + "self_attn.k_proj.weight"].T.reshape(d, k, dh),
        "wv": hf[p + "self_attn.v_proj.weight"].T.reshape(d, k, dh),
        "wo": hf[p + "self_attn.o_proj.weight"].T.reshape(h, dh, d),
        "mlp_norm": hf[p + "post_attention_layernorm.weight"],
        "w_gate": hf[p + "mlp.gate_proj.weight"].T,
        "w_up": hf[p + "mlp.up_proj.weight"].T,
        "w_down": hf[p + "mlp.down_proj.weight"].T,
    }


@pytest.fixture(scope="module")
def hf_model(ckpt_builders: Any) -> Any:
    return ckpt_builders.hf_tiny_model(seed=0)


@pytest.fixture(scope="module")
def hf_dir(hf_model: Any, ckpt_builders: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = ckpt_builders.hf_save(hf_model, tmp_path_factory.mktemp("hf") / "model")
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    return src


def test_hf_layout_config_and_files(hf_model: Any, hf_dir: Path, ckpt_builders: Any, tmp_path: Path) -> None:
    dst = convert("hf", hf_dir, tmp_path / "ckpt", dtype="float32", progress=False)
    cfg = ck.read_config(dst)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (64, 4, 2, 500_000.0, False)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 64
    assert ck.read_metadata(dst)["source"] == "hf"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).is_file(), name
    hf = ckpt_builders.hf_state_numpy(hf_model)
    for i in range(cfg.n_layers):
        got, want = ck.read_layer(dst, i), expected_internal(hf, cfg, i)
        for k in ck.LAYER_KEYS:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    g = ck.read_globals(dst)
    np.testing.assert_array_equal(g["embed"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(g["lm_head"], hf["lm_head.weight"].T)


def test_hf_sharded_bf16_source_tied(ckpt_builders: Any, tmp_path: Path) -> None:
    import torch

    model = ckpt_builders.hf_tiny_model(seed=1, tie=True, kv_heads=4).to(torch.bfloat16)
    src = ckpt_builders.hf_save(model, tmp_path / "hf", max_shard_size="30KB")
    assert len(list(src.glob("model-*.safetensors"))) > 2
    dst = convert("hf", src, tmp_path / "ckpt", progress=False)  # bfloat16, no widening on the way
    assert ck.read_config(dst).tie_embeddings and set(ck.read_globals(dst)) == {"embed", "norm"}
    hf = {k: v.float().numpy() for k, v in model.state_dict().items()}
    got = ck.read_layer(dst, 1)
    np.testing.assert_array_equal(got["wq"].astype(np.float32), expected_internal(hf, ck.read_config(dst), 1)["wq"])


def _hf_variant(src: Path, dst: Path, edit: Any) -> Path:
    """A copy of an HF directory with `edit(state, config)` applied."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    state = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    edit(state, config)
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s, c: s.pop("model.layers.1.mlp.up_proj.weight"),
         "tensor model.layers.1.mlp.up_proj.weight is missing"),
        (lambda s, c: c.update(intermediate_size=128),
         r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), but the config "
         r"implies \(128, 64\)"),
        (lambda s, c: c.update(model_type="mistral", architectures=["MistralForCausalLM"]),
         "config.json: model_type='mistral'.*only the Llama architecture"),
        (lambda s, c: c.pop("hidden_size"), "config.json: missing required field 'hidden_size'"),
    ],
    ids=["missing-tensor", "shape-mismatch", "unknown-architecture", "missing-field"],
)
def test_hf_bad_input(edit: Any, message: str, hf_dir: Path, tmp_path: Path) -> None:
    src = _hf_variant(hf_dir, tmp_path / "src", edit)
    with pytest.raises(ConvertError, match=message):
        convert("hf", src, tmp_path / "out" / "ckpt", progress=False)
    assert only_entries(tmp_path / "out") == []


def test_hf_missing_and_truncated_files(hf_model: Any, ckpt_builders: Any, tmp_path: Path) -> None:
    src = ckpt_builders.hf_save(hf_model, tmp_path / "hf", max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-100])
    with pytest.raises(ConvertError, match=f"{shards[1].name}: not a readable safetensors file"):
        convert("hf", src, tmp_path / "out" / "a", progress=False)
    shards[1].unlink()
    with pytest.raises(ConvertError, match=f"{shards[1].name}: missing"):
        convert("hf", src, tmp_path / "out" / "b", progress=False)
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(ConvertError, match="no model.safetensors or model.safetensors.index.json"):
        convert("hf", src, tmp_path / "out" / "c", progress=False)
    assert only_entries(tmp_path / "out") == []


# ---------------------------------------------------------------- Meta


def test_meta_shards_merge_to_the_hf_layout(ckpt_builders: Any, tmp_path: Path) -> None:
    """1, 2 and 4 model-parallel shards (and Llama 2's model-dim split of the embedding) give the
    same checkpoint as the HF form of the weights."""
    params = ckpt_builders.meta_params()
    state = ckpt_builders.meta_random_state(params, seed=0)
    (tmp_path / "meta1-0").mkdir()
    (tmp_path / "meta1-0" / "tokenizer.model").write_bytes(b"not really a tokenizer")
    ckpts = [convert("meta", ckpt_builders.meta_write(tmp_path / f"meta{n}-{e}", params, state, n, embed_axis=e),
                     tmp_path / f"ckpt{n}-{e}", dtype="float32", progress=False)
             for n, e in ((1, 0), (2, 0), (4, 0), (2, 1))]
    cfg = ck.read_config(ckpts[0])
    assert (cfg.ffn_dim, cfg.vocab_size, cfg.rope_scaling is not None) == (192, 256, True)
    assert (ckpts[0] / "tokenizer.model").is_file() and (ckpts[0] / "params.json").is_file()
    hf = ckpt_builders.meta_to_hf_state(state, params)
    for dst in ckpts:
        assert ck.read_config(dst) == cfg
        for i in range(cfg.n_layers):
            got, want = ck.read_layer(dst, i), expected_internal(hf, cfg, i)
            for k in ck.LAYER_KEYS:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{dst.name} layer {i} {k}")
        np.testing.assert_array_equal(ck.read_globals(dst)["lm_head"], hf["lm_head.weight"].T)


def test_meta_vocab_from_embedding_when_params_lack_it(ckpt_builders: Any, tmp_path: Path) -> None:
    params = ckpt_builders.meta_params()
    state = ckpt_builders.meta_random_state(params, seed=0)
    del params["vocab_size"]
    dst = convert("meta", ckpt_builders.meta_write(tmp_path / "m", params, state, 2), tmp_path / "c", dtype=None,
                  progress=False)
    assert ck.read_config(dst).vocab_size == 256
    assert ck.read_metadata(dst)["dtype"] == "float32"  # dtype None: float32 for models under 2B parameters


def test_meta_bad_input(ckpt_builders: Any, tmp_path: Path) -> None:
    import torch

    params = ckpt_builders.meta_params()
    state = ckpt_builders.meta_random_state(params, seed=0)
    out = tmp_path / "out"
    src = ckpt_builders.meta_write(tmp_path / "m", params, state, 2)
    shard1 = src / "consolidated.01.pth"

    shard = torch.load(shard1, weights_only=True)
    bad = {**shard, "layers.1.attention.wo.weight": shard["layers.1.attention.wo.weight"][:, :-2].clone()}
    torch.save(bad, shard1)
    with pytest.raises(ConvertError, match=r"consolidated.01.pth: tensor layers.1.attention.wo.weight has shape"):
        convert("meta", src, out / "a", progress=False)
    torch.save({k: v for k, v in shard.items() if k != "layers.0.feed_forward.w3.weight"}, shard1)
    with pytest.raises(ConvertError, match="consolidated.01.pth: tensor layers.0.feed_forward.w3.weight is missing"):
        convert("meta", src, out / "b", progress=False)
    torch.save(shard, shard1)
    shard1.write_bytes(shard1.read_bytes()[:1000])
    with pytest.raises(ConvertError, match="consolidated.01.pth: not a readable PyTorch checkpoint"):
        convert("meta", src, out / "c", progress=False)
    shard1.unlink()
    (src / "consolidated.02.pth").write_bytes((src / "consolidated.00.pth").read_bytes())
    with pytest.raises(ConvertError, match="consolidated.01.pth is missing"):
        convert("meta", src, out / "d", progress=False)
    (src / "consolidated.02.pth").rename(shard1)
    (src / "params.json").write_text(json.dumps({**params, "moe_args": {"num_experts": 8}}))
    with pytest.raises(ConvertError, match="params.json: .*mixture-of-experts"):
        convert("meta", src, out / "e", progress=False)
    (src / "params.json").unlink()
    with pytest.raises(ConvertError, match="params.json: missing"):
        convert("meta", src, out / "f", progress=False)
    assert only_entries(out) == []


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_case(hf_model: Any, ckpt_builders: Any) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    from llama_jax.config import LlamaConfig as C

    cfg = C.from_hf(hf_model.config.to_dict())
    return cfg, ckpt_builders.hf_state_numpy(hf_model)


def test_gguf_float32_equals_hf_conversion(gguf_case: tuple, hf_dir: Path, ckpt_builders: Any,
                                           tmp_path: Path) -> None:
    """llama.cpp's Q/K permutation is undone exactly; rope_freqs.weight becomes the llama3 scaling."""
    from convert.gguf import llama3_rope_divisors

    cfg, hf = gguf_case
    freqs = llama3_rope_divisors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert 1.0 < freqs.max() == cfg.rope_scaling.factor and freqs.min() == 1.0
    path = ckpt_builders.gguf_write(tmp_path / "m.gguf", cfg.replace(rope_scaling=None), hf,
                                    extra_tensors={"rope_freqs.weight": freqs},
                                    extra_metadata={"llama.rope.scaling.original_context_length": 64})
    a = convert("gguf", path, tmp_path / "a", dtype="float32", progress=False)
    b = convert("hf", hf_dir, tmp_path / "b", dtype="float32", progress=False)
    assert ck.read_config(a).rope_scaling == cfg.rope_scaling
    for i in range(cfg.n_layers):
        la, lb = ck.read_layer(a, i), ck.read_layer(b, i)
        for k in ck.LAYER_KEYS:
            np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
    ga, gb = ck.read_globals(a), ck.read_globals(b)
    for k in gb:
        np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)
    tok = json.loads((a / "gguf_tokenizer.json").read_text())
    assert (tok["format"], tok["version"], tok["source"]) == ("gguf-tokenizer", 1, "m.gguf")
    meta = tok["metadata"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"] and meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert meta["tokenizer.ggml.merges"] == ["t 0", "t 1"] and meta["tokenizer.ggml.add_bos_token"] is False
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.chat_template"] == "{{ messages }}" and "tokenizer.ggml.eot_token_id" not in meta


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_dequantises(qtype: str, gguf_case: tuple, ckpt_builders: Any, tmp_path: Path) -> None:
    import gguf

    cfg, hf = gguf_case
    kind = gguf.GGMLQuantizationType[qtype]
    path = ckpt_builders.gguf_write(tmp_path / "m.gguf", cfg, hf,
                                    qtype=lambda name: "F32" if name.endswith("norm.weight") else qtype)
    dst = convert("gguf", path, tmp_path / "ckpt", dtype="float32", progress=False)
    w = hf["model.layers.1.mlp.down_proj.weight"]
    want = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind) if qtype not in ("F16",) else w.astype(
        np.float16).astype(np.float32)
    np.testing.assert_array_equal(ck.read_layer(dst, 1)["w_down"], want.T)
    tol = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}[qtype]
    got_q = ck.read_layer(dst, 0)["wq"]
    want_q = expected_internal(hf, cfg, 0)["wq"]
    assert np.max(np.abs(got_q - want_q)) <= tol * np.max(np.abs(want_q))


def test_a_source_resolved_by_two_at_once_is_converted_once(gguf_case: tuple, ckpt_builders: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers sharing the cache (ranks on one host, servers started together) wait for one
    conversion and all get the finished checkpoint, never a half-written one."""
    import threading

    from llama_jax import sources

    cfg, hf = gguf_case
    src = ckpt_builders.gguf_write(tmp_path / "m.gguf", cfg, hf)
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "cache"))
    calls, started = [], threading.Event()
    real = sources._convert

    def slow_convert(*args: Any, **kw: Any) -> None:
        calls.append(args)
        started.set()
        real(*args, **kw)

    monkeypatch.setattr(sources, "_convert", slow_convert)
    got: list[Path] = []
    first = threading.Thread(target=lambda: got.append(sources.resolve_checkpoint(src, progress=False)))
    first.start()
    assert started.wait(60)
    got.append(sources.resolve_checkpoint(src, progress=False))  # blocks on the lock, then finds it done
    first.join()
    assert len(calls) == 1 and got[0] == got[1] and ck.read_config(got[0]).n_layers == cfg.n_layers
    assert sources.resolve_checkpoint(src, progress=False) == got[0] and len(calls) == 1


def test_gguf_bad_input(gguf_case: tuple, ckpt_builders: Any, tmp_path: Path) -> None:
    cfg, hf = gguf_case
    out = tmp_path / "out"
    path = ckpt_builders.gguf_write(tmp_path / "q5.gguf", cfg, hf,
                                    qtype=lambda name: "Q5_0" if name == "blk.1.ffn_up.weight" else "F32")
    with pytest.raises(ConvertError, match="q5.gguf: tensor blk.1.ffn_up.weight has type Q5_0, which is not supp"):
        convert("gguf", path, out / "a", progress=False)

    path = ckpt_builders.gguf_write(tmp_path / "ok.gguf", cfg, hf)
    data = path.read_bytes()
    path.with_name("trunc.gguf").write_bytes(data[:-3000])
    with pytest.raises(ConvertError, match="trunc.gguf: not a readable GGUF file, truncated or corrupt"):
        convert("gguf", path.with_name("trunc.gguf"), out / "b", progress=False)
    path.with_name("header.gguf").write_bytes(data[:200])
    with pytest.raises(ConvertError, match="header.gguf: not a readable GGUF file"):
        convert("gguf", path.with_name("header.gguf"), out / "c", progress=False)

    partial = {k: v for k, v in hf.items() if k != "model.layers.0.self_attn.v_proj.weight"}
    path = ckpt_builders.gguf_write(tmp_path / "missing.gguf", cfg, partial)
    with pytest.raises(ConvertError, match="missing.gguf: tensor blk.0.attn_v.weight is missing"):
        convert("gguf", path, out / "d", progress=False)

    path = ckpt_builders.gguf_write(tmp_path / "qwen.gguf", cfg, hf, architecture="qwen2")
    with pytest.raises(ConvertError, match="qwen.gguf: general.architecture='qwen2'"):
        convert("gguf", path, out / "e", progress=False)

    path = ckpt_builders.gguf_write(tmp_path / "linear.gguf", cfg, hf, extra_metadata={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    with pytest.raises(ConvertError, match="linear.gguf: llama.rope.scaling.type='linear': only 'llama3'"):
        convert("gguf", path, out / "g", progress=False)

    path = ckpt_builders.gguf_write(tmp_path / "yarn.gguf", cfg, hf, extra_tensors={
        "rope_freqs.weight": np.linspace(1, 4, cfg.head_dim // 2, dtype=np.float32)})
    with pytest.raises(ConvertError, match="rope_freqs.weight does not match the 'llama3' rotary scaling"):
        convert("gguf", path, out / "f", progress=False)
    assert only_entries(out) == []


@pytest.mark.slow
def test_smollm2_gguf_conversion(smol_checkpoint: Path) -> None:
    cfg = ck.read_config(smol_checkpoint)
    assert cfg == LlamaConfig.from_preset("smollm2-135m").replace(norm_eps=cfg.norm_eps)
    assert abs(cfg.norm_eps - 1e-5) < 1e-10
    meta = json.loads((smol_checkpoint / "gguf_tokenizer.json").read_text())["metadata"]
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == 49_152
    assert meta["tokenizer.ggml.tokens"][1] == "<|im_start|>" and len(meta["tokenizer.ggml.merges"]) == 48_900
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    g = ck.read_globals(smol_checkpoint)
    assert set(g) == {"embed", "norm"} and g["embed"].dtype == np.float32


# ---------------------------------------------------------------- command line


def test_cli_converts_and_refuses_to_overwrite(gguf_case: tuple, ckpt_builders: Any, tmp_path: Path) -> None:
    cfg, hf = gguf_case
    src = ckpt_builders.gguf_write(tmp_path / "m.gguf", cfg, hf, qtype=lambda n: "Q8_0" if "ffn" in n else "F32")
    dst = tmp_path / "ckpt"
    proc = run_cli("gguf", str(src), str(dst))
    assert proc.returncode == 0, proc.stderr
    assert ck.is_checkpoint(dst) and ck.read_metadata(dst)["dtype"] == "bfloat16"
    proc = run_cli("gguf", str(src), str(dst), "--dtype", "float32")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"llama-jax-convert: error: {dst}: already exists (pass overwrite=True / " \
                                  "--overwrite to replace it)"
    proc = run_cli("gguf", str(src), str(dst), "--dtype", "float32", "--overwrite")
    assert proc.returncode == 0 and ck.read_metadata(dst)["dtype"] == "float32"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "kind, make_src, message",
    [
        ("hf", lambda d: d, "config.json: file not found"),
        ("meta", lambda d: d / "nope", "nope: not a directory"),
        ("gguf", lambda d: _write(d / "x.gguf", b"GGUF\x03\x00"), "x.gguf: not a readable GGUF"),
    ],
    ids=["hf-no-config", "meta-missing-dir", "gguf-garbage"],
)
def test_cli_bad_input_one_line_error(kind: str, make_src: Any, message: str, tmp_path: Path) -> None:
    src = make_src(tmp_path)
    proc = run_cli(kind, str(src), str(tmp_path / "out" / "ckpt"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-jax-convert: error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
