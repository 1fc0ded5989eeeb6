"""Quantization (llama_jax/quantization.py): the numerics, the `dense` hook under scan, the int8
KV cache, quantized checkpoints (convert-time and load-time), the import of pre-quantized FP8 HF
checkpoints, tp=8 sharding, and quality on the demo model.

Thresholds follow from the formats. Symmetric absmax int8 rounds each weight to within half a
step (amax/254 of its channel): about 1% relative error on Gaussian weights. float8_e4m3fn keeps
3 mantissa bits: up to 2^-4 relative per weight, about 3.6% rms. The logits' relative errors on
random tiny models land near those figures; the tests allow about twice as much.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import llama_jax
from convert import convert
from convert.__main__ import main as convert_main
from llama_jax import checkpoint as ck
from llama_jax import quantization as q
from llama_jax.config import LlamaConfig
from llama_jax.model import KVCache, Llama, forward
from llama_jax.tokenizer import llama3_tokenizer

REPO = Path(__file__).resolve().parents[1]
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
EQUATIONS = {"wq": "btd,dnh->btnh", "wo": "btnh,nhd->btd", "w_up": "btd,df->btf", "w_down": "btf,fd->btd"}


def rel_err(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaConfig, dict]:
    config = LlamaConfig.from_preset("tiny")
    return config, Llama(config, rngs=nnx.Rngs(0), dtype=jnp.float32).params()


def logits(config: LlamaConfig, params: dict, tokens: np.ndarray, cache_dtype: Any = jnp.float32) -> np.ndarray:
    """Full-sequence float32 logits (B, T, V), through a cache of `cache_dtype`."""
    return np.asarray(_logits(config, params, jnp.asarray(tokens), jnp.dtype(cache_dtype)))


@jax.jit(static_argnums=(0, 3))
def _logits(config: LlamaConfig, params: dict, tokens: jax.Array, cache_dtype: Any) -> jax.Array:
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return forward(params, config, tokens, pos, KVCache.zeros(config, b, t, cache_dtype))[0]


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("mode", q.MODES)
def test_quantize_bounds_the_error_and_numpy_equals_jax(mode: str) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((3, 37, 5, 6)) * rng.uniform(0.01, 3, (3, 1, 5, 6))).astype(np.float32)
    w[1, :, 2, 3] = 0  # an all-zero channel
    value, scale = q.quantize(w, (1,), mode)
    assert value.dtype == q.qdtype(mode) and scale.shape == (3, 1, 5, 6) and scale.dtype == np.float32
    assert np.all(np.isfinite(scale)) and not value.astype(np.float32)[1, :, 2, 3].any()
    err = np.abs(value.astype(np.float32) * scale - w)
    if mode == "int8":
        assert np.abs(value.astype(np.int32)).max() == 127
        assert np.all(err <= scale / 2 * (1 + 1e-6))
    else:  # 3 mantissa bits: half a step is 2^-4 of the value; subnormals (below 2^-6 * scale) step by 2^-9
        assert np.all(err <= np.maximum(np.abs(w) * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6))
    # The converter quantizes in numpy, the loader in JAX: bit for bit the same.
    jv, js = jax.jit(lambda a: q.quantize(a, (1,), mode))(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(jv).view(np.uint8), value.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(js), scale)


@pytest.mark.parametrize("name", list(EQUATIONS))
def test_dense_under_scan_equals_the_dequantized_einsum(name: str) -> None:
    """Each layer's slice of a stacked QuantizedWeight multiplies like its dequantized weight; the
    float8 x float8 matmul (Hopper's path, emulated here) stays within activation rounding."""
    shapes = {"wq": (3, 40, 3, 8), "wo": (3, 3, 8, 40), "w_up": (3, 40, 72), "w_down": (3, 72, 40)}
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal(shapes[name]), jnp.float32)
    x_sub = EQUATIONS[name].split(",")[0]
    x = jnp.asarray(rng.standard_normal((2, 5, *shapes[name][1 : 1 + q.INPUT_AXES[name]])), jnp.float32)
    assert len(x_sub) == x.ndim

    @jax.jit
    def run(weight: q.QuantizedWeight) -> jax.Array:
        return jax.lax.scan(lambda c, wl: (c, wl.dense(EQUATIONS[name], x)), 0, weight)[1]

    exact = jnp.stack([jnp.einsum(EQUATIONS[name], x, d) for d in w])
    for mode, bound in (("int8", 0.01), ("fp8", 0.05)):
        qw = q.quantize_weight(w, name, mode)
        assert qw.scale.shape == q.scale_shape(name, shapes[name], stacked=True)
        dequantized = jnp.stack([jnp.einsum(EQUATIONS[name], x, d) for d in qw.dequantize()])
        got = run(qw)
        np.testing.assert_allclose(got, dequantized, rtol=1e-5, atol=1e-5)
        assert rel_err(got, exact) < bound
    fp8_matmul = q.QuantizedWeight(qw.value, qw.scale, fp8_matmul=True)  # activations rounded to float8 too
    assert rel_err(run(fp8_matmul), dequantized) < 0.06


def test_quantized_model_logits_relative_error(tiny: tuple) -> None:
    config, params = tiny
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 24)).astype(np.int32)
    ref = logits(config, params, tokens)
    errors = {mode: rel_err(logits(config, q.quantize_params(params, mode), tokens), ref) for mode in q.MODES}
    errors["int8 cache"] = rel_err(logits(config, params, tokens, jnp.int8), ref)
    assert errors["int8"] < 0.02 and errors["fp8"] < 0.08 and errors["int8 cache"] < 0.01, errors
    assert errors["int8 cache"] > 0  # the cache really is quantized


def test_int8_cache_decode_equals_prefill(tiny: tuple) -> None:
    """Scales are per token: decoding token by token into the int8 cache (rows given, batch
    parallel rows) stores the same keys and values, and gives the same logits, as one prefill."""
    config, params = tiny
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 10)).astype(np.int32)
    full = logits(config, params, tokens, jnp.int8)
    cache = KVCache.zeros(config, 3, 16, jnp.int8)
    assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == (config.n_layers, 3, 16, config.n_kv_heads)
    step = jax.jit(lambda c, t, p, r: forward(params, config, t, p, c, cache_rows=r))
    rows = jnp.asarray([2, 0])
    out, cache = step(cache, jnp.asarray(tokens[:, :6]), jnp.broadcast_to(jnp.arange(6), (2, 6)), rows)
    np.testing.assert_allclose(out, full[:, :6], rtol=1e-4, atol=1e-4)
    for t in range(6, 10):
        out, cache = step(cache, jnp.asarray(tokens[:, t : t + 1]), jnp.full((2, 1), t), rows)
        np.testing.assert_allclose(out[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
    assert not np.asarray(cache.k_scale[:, 1]).any()  # row 1 untouched
    # Bytes per token and head: Dh int8 values and one float32 scale, against 2 * Dh in bfloat16.
    bf16 = KVCache.zeros(config, 3, 16, jnp.bfloat16)
    ratio = sum(a.nbytes for a in jax.tree.leaves(cache)) / sum(a.nbytes for a in jax.tree.leaves(bf16))
    assert ratio == (config.head_dim + 4) / (2 * config.head_dim)


# ---------------------------------------------------------------- checkpoints and converters


@pytest.fixture(scope="module")
def hf_dir(ckpt_builders: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ckpt_builders.hf_save(ckpt_builders.hf_tiny_model(seed=0), tmp_path_factory.mktemp("hf") / "model")


def test_convert_quantized_equals_quantizing_at_load(hf_dir: Path, tmp_path: Path) -> None:
    plain = convert("hf", hf_dir, tmp_path / "plain", dtype="float32", progress=False)
    assert convert_main(["hf", str(hf_dir), str(tmp_path / "int8"), "--dtype", "float32", "--quantize", "int8",
                         "--no-progress"]) == 0
    stored = tmp_path / "int8"
    assert ck.read_metadata(stored)["quantization"] == {"mode": "int8", "weights": list(q.QUANTIZABLE)}
    assert "quantization" not in ck.read_metadata(plain)
    layer = ck.read_layer(stored, 1)
    assert layer["wq"].dtype == np.int8 and layer["attn_norm"].dtype == np.float32
    assert layer["wo_scale"].shape == (1, 1, 64) and layer["wo_scale"].dtype == np.float32
    a = ck.restore_params(stored, progress=False)
    b = ck.restore_params(plain, progress=False, quantize="int8")
    for name in q.QUANTIZABLE:
        assert isinstance(a["layers"][name], q.QuantizedWeight) and a["layers"][name].value.dtype == jnp.int8
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    # One tree per layer (the unrolled layout load() uses): the same weights, split.
    per_layer = ck.restore_params(plain, progress=False, quantize="int8", stacked=False)["layers"]
    assert len(per_layer) == 2 and isinstance(per_layer[1]["wq"], q.QuantizedWeight)
    for name in q.QUANTIZABLE:
        for field in ("value", "scale"):
            np.testing.assert_array_equal(getattr(per_layer[1][name], field), getattr(b["layers"][name], field)[1])
    # fp8 on top of int8 is refused; int8 again is what is stored.
    with pytest.raises(ck.CheckpointError, match="already quantized as int8"):
        ck.restore_params(stored, progress=False, quantize="fp8")
    assert isinstance(ck.restore_params(stored, progress=False, quantize="int8")["layers"]["wq"], q.QuantizedWeight)


def _byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_lm_head_quantized_on_request(hf_dir: Path, tmp_path: Path) -> None:
    """load(quantize_lm_head=True) quantizes the untied head too (one scale per vocabulary entry),
    with `quantize`'s mode or a stored checkpoint's; logits move by about int8's rounding error.
    Without a mode, or with a tied head, it refuses before reading any weight."""
    plain = convert("hf", hf_dir, tmp_path / "plain", dtype="float32", progress=False)
    stored = convert("hf", hf_dir, tmp_path / "int8", dtype="float32", progress=False, quantize="int8")
    for ckpt in (plain, stored):  # load() wants a tokenizer: one token per byte fits the 256-entry vocabulary
        _byte_tokenizer().save(str(Path(ckpt) / "tokenizer.json"))
    kw = dict(dtype="float32", max_slots=1, max_seq_len=64, progress=False, compilation_cache=False)
    layers_only = llama_jax.load(plain, quantize="int8", **kw)
    with_head = llama_jax.load(plain, quantize="int8", quantize_lm_head=True, **kw)
    head = with_head.params["lm_head"]
    config = with_head.config
    assert isinstance(head, q.QuantizedWeight) and head.value.dtype == jnp.int8
    assert head.scale.shape == (1, config.vocab_size)
    assert not isinstance(layers_only.params["lm_head"], q.QuantizedWeight)
    np.testing.assert_array_equal(llama_jax.load(stored, quantize_lm_head=True, **kw).params["lm_head"].value, head.value)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    err = rel_err(logits(config, with_head.params, tokens), logits(config, layers_only.params, tokens))
    assert 0 < err < 0.02, err
    with pytest.raises(ValueError, match="needs quantize"):
        llama_jax.load(plain, quantize_lm_head=True, **kw)
    layers_only.tokenizer = llama3_tokenizer()  # a tokenizer that does not fit the model: a clear error
    with pytest.raises(ValueError, match="token id 128000 is outside the vocabulary"):
        layers_only.generate("hello")
    # The scripts' flags reach load(): generate.py with everything quantized, and the refusal.
    script = [sys.executable, str(REPO / "scripts" / "generate.py"), "--ckpt", str(plain), "--raw", "--max-tokens",
              "4", "--temperature", "0", "--max-seq-len", "64", "--dtype", "float32"]
    ok = subprocess.run([*script, "--quantize", "int8", "--quantize-lm-head", "--cache-dtype", "int8", "hello"],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0 and "tokens/s" in ok.stderr, ok.stderr[-2000:]
    refused = subprocess.run([*script, "--quantize-lm-head", "hello"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "needs quantize" in refused.stderr, refused.stderr[-2000:]
    tied = LlamaConfig.from_preset("tiny-mha-tied")
    weights = jax.device_get(Llama(tied, rngs=nnx.Rngs(0), dtype=jnp.float32).params())
    with ck.CheckpointWriter(tmp_path / "tied", tied, "float32", "hf") as w:
        w.write_globals({k: v for k, v in weights.items() if k != "layers"})
        for i in range(tied.n_layers):
            w.write_layer(i, {k: v[i] for k, v in weights["layers"].items()})
    with pytest.raises(ValueError, match="tied"):
        llama_jax.load(tmp_path / "tied", quantize="int8", quantize_lm_head=True, **kw)


def test_writer_refuses_unquantized_values(tmp_path: Path) -> None:
    config = LlamaConfig.from_preset("tiny")
    spec = q.WeightQuantization("fp8", ("w_up",))
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in ck.layer_shapes(config).items()}
    with pytest.raises(ck.CheckpointError, match="missing tensor.*w_up_scale"):
        with ck.CheckpointWriter(tmp_path / "c", config, "bfloat16", "hf", quantization=spec) as w:
            w.write_layer(0, tensors)
    tensors["w_up_scale"] = np.ones((1, config.ffn_dim), np.float32)
    with pytest.raises(ck.CheckpointError, match="w_up is float32; this checkpoint stores it quantized as float8"):
        with ck.CheckpointWriter(tmp_path / "c", config, "bfloat16", "hf", quantization=spec) as w:
            w.write_layer(0, tensors)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- pre-quantized FP8 HF checkpoints

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def fake_fp8_checkpoint(model: Any, path: Path, method: str, bf16_mlp_layers: tuple[int, ...] = ()) -> dict:
    """An HF FP8 checkpoint as published: MLP linear layers in float8_e4m3fn with float32 scales
    per output row (fbgemm_fp8) or per tensor (compressed-tensors), everything else in bfloat16,
    the MLP of `bf16_mlp_layers` left unconverted. Returns the dequantized float32 state."""
    import torch
    from safetensors.torch import save_file

    layers = model.config.num_hidden_layers
    skip = ["lm_head"] + [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in _ATTN]
    skip += [f"model.layers.{i}.mlp.{p}" for i in bf16_mlp_layers for p in _MLP]
    tensors, dequantized = {}, {}
    for name, w in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if ".mlp." in name and module not in skip:
            amax = w.abs().amax(dim=1, keepdim=True) if method == "fbgemm_fp8" else w.abs().amax().reshape(1)
            scale = amax / 448
            value = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale"] = value, scale.float()
            tensors[module + ".input_scale_ub"] = torch.tensor([1200.0])  # present in Meta's files, unused here
            dequantized[name] = value.float() * scale
        else:
            tensors[name] = w.to(torch.bfloat16)
            dequantized[name] = tensors[name].float()
    if method == "fbgemm_fp8":
        qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": skip}
    else:
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": skip,
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                  "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}}}}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string()) | {"quantization_config": qc}
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


def test_fbgemm_fp8_import_equals_the_dequantized_reference(ckpt_builders: Any, tmp_path: Path) -> None:
    import torch

    model = ckpt_builders.hf_tiny_model(seed=1)
    dequantized = fake_fp8_checkpoint(model, tmp_path / "hf", "fbgemm_fp8")
    dst = convert("hf", tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    assert ck.read_quantization(dst) == q.WeightQuantization("fp8", ("w_gate", "w_up", "w_down"))
    # The FP8 bytes are stored as published (transposed to the internal layout), never rounded again.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        src = f.get_tensor("model.layers.1.mlp.down_proj.weight").view(torch.uint8).numpy()
        src_scale = f.get_tensor("model.layers.1.mlp.down_proj.weight_scale").numpy()
    layer = ck.read_layer(dst, 1)
    np.testing.assert_array_equal(layer["w_down"].view(np.uint8), src.T)
    np.testing.assert_array_equal(layer["w_down_scale"], src_scale.reshape(1, -1))
    assert layer["wq"].dtype == np.float32  # attention stays unquantized (bfloat16 values, stored as float32)

    model.load_state_dict(dequantized)
    tokens = np.random.default_rng(4).integers(0, 256, (2, 12))
    with torch.no_grad():
        want = model(torch.as_tensor(tokens)).logits.float().numpy()
    got = logits(ck.read_config(dst), ck.restore_params(dst, progress=False), tokens.astype(np.int32))
    assert rel_err(got, want) < 1e-5


def test_compressed_tensors_fp8_with_unconverted_layers(ckpt_builders: Any, tmp_path: Path) -> None:
    """Per-tensor scales broadcast to every row; an MLP left in bfloat16 in one layer is quantized
    to fp8 here (the layer stack needs one type per weight); --quantize fp8 adds the attention."""
    model = ckpt_builders.hf_tiny_model(seed=2)
    dequantized = fake_fp8_checkpoint(model, tmp_path / "hf", "compressed-tensors", bf16_mlp_layers=(0,))
    dst = convert("hf", tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16", progress=False)
    layer0, layer1 = ck.read_layer(dst, 0), ck.read_layer(dst, 1)
    up = dequantized["model.layers.1.mlp.up_proj.weight"].numpy().T
    np.testing.assert_array_equal(layer1["w_up"].astype(np.float32) * layer1["w_up_scale"], up)
    assert np.unique(layer1["w_up_scale"]).size == 1  # one scale per tensor, on every row
    bf16 = dequantized["model.layers.0.mlp.up_proj.weight"].numpy().T
    value, scale = q.quantize(bf16, (0,), "fp8")
    np.testing.assert_array_equal(layer0["w_up"].view(np.uint8), value.view(np.uint8))
    np.testing.assert_array_equal(layer0["w_up_scale"], scale)
    assert layer0["wq"].dtype == ml_dtypes.bfloat16

    dst = convert("hf", tmp_path / "hf", tmp_path / "all", dtype="bfloat16", progress=False, quantize="fp8")
    assert ck.read_quantization(dst) == q.WeightQuantization("fp8")
    np.testing.assert_array_equal(ck.read_layer(dst, 1)["w_up"].view(np.uint8), layer1["w_up"].view(np.uint8))
    assert ck.read_layer(dst, 1)["wq"].dtype == FP8


def test_unsupported_quantized_sources_are_refused(ckpt_builders: Any, tmp_path: Path) -> None:
    from convert import ConvertError

    model = ckpt_builders.hf_tiny_model(seed=3)
    fake_fp8_checkpoint(model, tmp_path / "hf", "fbgemm_fp8")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(ConvertError, match="quant_method='gptq' is not supported"):
        convert("hf", tmp_path / "hf", tmp_path / "ckpt", progress=False)
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="already quantized as fp8"):
        convert("hf", tmp_path / "hf", tmp_path / "ckpt", progress=False, quantize="int8")


# ---------------------------------------------------------------- sharding


def test_tp8_quantized_weights_and_int8_cache(tmp_path: Path) -> None:
    """On 8 simulated devices (a fresh process): quantizing while restoring onto a tp=8 mesh puts
    values and scales in their shardings, the decode step gathers no weight, and greedy tokens
    equal those of one device."""
    script = textwrap.dedent(f"""
        import json, re, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        import jax, jax.numpy as jnp
        from sharding_checks import check_shardings, greedy, random_params, weight_gathers, write_checkpoint
        from llama_jax import checkpoint, quantization
        from llama_jax.config import LlamaConfig
        from llama_jax.engine import Engine
        from llama_jax.sharding import ModelShardings, make_mesh

        config = LlamaConfig.from_preset("tiny-8kv")
        path = {str(tmp_path / "ckpt")!r}
        write_checkpoint(path, config, random_params(config), "float32")

        def engine(params, shardings):
            return Engine(config, params, max_slots=4, max_seq_len=64, prefill_buckets=(16,), decode_steps=4,
                          cache_dtype=jnp.int8, shardings=shardings)

        ref = greedy(engine(checkpoint.restore_params(path, progress=False, quantize="int8"), None), config)
        sh = ModelShardings(config, make_mesh("tp=8"))
        params = checkpoint.restore_params(path, shardings=sh.params, progress=False, quantize="int8")
        sh.params = quantization.param_shardings(sh.params, params)  # (value, scale) pairs
        check_shardings(params, sh.params, "restored")
        wq, wo = params["layers"]["wq"], params["layers"]["wo"]
        specs = {{k: str(getattr(params["layers"][k[:2]], k[3:]).sharding.spec)
                 for k in ("wq.value", "wq.scale", "wo.value", "wo.scale")}}
        assert len(wq.scale.addressable_shards) == 8 and wq.scale.sharding.shard_shape(wq.scale.shape)[2] == 2, specs
        assert wo.scale.sharding.is_fully_replicated, specs  # (L, 1, 1, D): nothing to split
        e = engine(params, sh)
        got = greedy(e, config)
        assert got == ref, (got, ref)
        check_shardings(e.cache, sh.cache_for(jnp.int8), "cache")
        hlo = e.lower_decode().compile().as_text()
        values = jax.tree.map(lambda w: w.value if isinstance(w, quantization.QuantizedWeight) else w, params,
                              is_leaf=lambda w: isinstance(w, quantization.QuantizedWeight))
        bad = weight_gathers(hlo, config, values, e.cache)
        assert not bad, bad

        # The LM head quantized on request: value split like the head, scale like its vocabulary.
        single = checkpoint.restore_params(path, progress=False, quantize="int8")
        single["lm_head"] = quantization.quantize_lm_head(single["lm_head"], "int8")
        head_sh = params["lm_head"].sharding
        params["lm_head"] = head = quantization.quantize_lm_head(params["lm_head"], "int8")
        assert head.value.sharding == head_sh and head.scale.sharding == head_sh, (head.value.sharding, head.scale.sharding)
        sh.params = jax.tree.map(lambda a: a.sharding, params)
        assert greedy(engine(params, sh), config) == greedy(engine(single, None), config)
        print("RESULT " + json.dumps({{"specs": specs, "tokens": got}}))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-4000:]


# ---------------------------------------------------------------- the demo model


def test_demo_model_kl_divergence(smol_checkpoint: Path) -> None:
    """Next-token distributions over a fixed text (64 tokens) against the float32 model. Measured:
    mean KL (nats) int8 0.0042, fp8 0.019, int8 cache 0.0006; top-1 agreement 97%, 92%, 100%."""
    from llama_jax.tokenizer import load_tokenizer

    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
            "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
            "produce books far faster than scribes. Within fifty years presses were running in more than two "
            "hundred European cities, and the price of books fell sharply. Cheaper books spread literacy, "
            "standardised spelling and helped scientists share results quickly.")
    tokens = np.asarray([load_tokenizer(smol_checkpoint).encode(text)[:64]], np.int32)
    assert tokens.shape == (1, 64)
    config = ck.read_config(smol_checkpoint)
    params = ck.restore_params(smol_checkpoint, progress=False)  # float32; quantizing at load is tested above
    ref = jax.nn.log_softmax(logits(config, params, tokens))

    def kl(variant: np.ndarray) -> tuple[float, float]:
        lq = jax.nn.log_softmax(variant)
        per_token = np.asarray(jnp.sum(jnp.exp(ref) * (ref - lq), axis=-1))
        return float(per_token.mean()), float(np.mean(np.argmax(ref, -1) == np.argmax(lq, -1)))

    stats = {"fp8": kl(logits(config, q.quantize_params(params, "fp8"), tokens)),
             "int8 cache": kl(logits(config, params, tokens, jnp.int8))}
    llm = llama_jax.load(smol_checkpoint, dtype="float32", quantize="int8", cache_dtype="int8", max_slots=1,
                         max_seq_len=64, compilation_cache=False, progress=False)
    assert isinstance(llm.params["layers"][0]["w_down"], q.QuantizedWeight) and llm.engine.cache.k.dtype == jnp.int8
    stats["int8"] = kl(llm.logits(tokens))
    assert stats["int8"][0] < 0.01 and stats["fp8"][0] < 0.05 and stats["int8 cache"][0] < 0.005, stats
    assert stats["int8"][1] >= 0.9 and stats["fp8"][1] >= 0.85 and stats["int8 cache"][1] >= 0.95, stats
