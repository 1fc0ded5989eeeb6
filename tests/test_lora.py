"""LoRA adapters and fine-tuning: gradients, learning, exact resumption, data checks, serving.

Most tests use a tiny random checkpoint with a byte-level ChatML tokenizer (built here); the
slow ones train the demo model (SmolLM2-135M-Instruct) on a made-up fact.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import lora
from llama_jax.config import LlamaConfig
from llama_jax.model import forward, param_shapes

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY = LlamaConfig(vocab_size=258, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=512,
                   rope_theta=10_000.0)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


finetune = _load_script("finetune")


@functools.partial(jax.jit, static_argnums=1)
def _logits(params: dict, config: LlamaConfig, tokens: jax.Array) -> jax.Array:
    """Logits (B, T, V) of tokens at positions 0..T-1, no cache."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return forward(params, config, tokens, positions, None)[0]


def _random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Random float32 weights (numpy draws: eager jax.random would compile once per shape)."""
    rng = np.random.default_rng(seed)

    def draw(name: str, shape: tuple[int, ...]) -> jax.Array:
        if name.endswith("norm"):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(shape), jnp.float32)
        fan_in = {"embed": 1, "lm_head": shape[0], "wo": math.prod(shape[1:-1])}.get(name, shape[1])
        return jnp.asarray(rng.standard_normal(shape) * fan_in**-0.5, jnp.float32)

    shapes = param_shapes(config)
    return {**{k: draw(k, s) for k, s in shapes.items() if k != "layers"},
            "layers": {k: draw(k, s) for k, s in shapes["layers"].items()}}


def _random_adapters(config: LlamaConfig, cfg: lora.LoraConfig, seed: int = 1) -> lora.Adapters:
    """Adapters with B nonzero too (a fresh one has B = 0, which would hide errors in B's path)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape), jnp.float32),
                        lora.init(config, cfg, jax.random.key(seed)))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random float32 llama-jax checkpoint with a byte-level BPE tokenizer (256 bytes +
    <|im_start|>, <|im_end|>) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from llama_jax.checkpoint import CheckpointWriter

    root = tmp_path_factory.mktemp("tiny")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    params = jax.tree.map(np.asarray, _random_params(TINY))
    dst = root / "ckpt"
    with CheckpointWriter(dst, TINY, "float32", "hf") as w:
        w.write_globals({k: v for k, v in params.items() if k != "layers"})
        for i in range(TINY.n_layers):
            w.write_layer(i, {k: v[i] for k, v in params["layers"].items()})
        w.copy_file(root / "tokenizer.json")
        w.copy_file(root / "tokenizer_config.json")
    return dst


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _dialog(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# ---------------------------------------------------------------- adapters


def test_fresh_adapter_is_identity_and_merge_equals_apply() -> None:
    params = _random_params(TINY)
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, TINY.vocab_size)
    base = _logits(params, TINY, tokens)
    fresh = _logits(lora.apply(params, lora.init(TINY, cfg, jax.random.key(0)), cfg), TINY, tokens)
    np.testing.assert_array_equal(np.asarray(fresh), np.asarray(base))

    adapters = _random_adapters(TINY, cfg)
    on_the_fly = _logits(lora.apply(params, adapters, cfg), TINY, tokens)
    merged = _logits(lora.merge(params, adapters, cfg), TINY, tokens)
    assert np.abs(np.asarray(on_the_fly) - np.asarray(base)).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(np.asarray(merged), np.asarray(on_the_fly), atol=2e-5, rtol=1e-5)


def test_adapter_composes_with_quantized_weights() -> None:
    """Over int8 weights (QuantizedWeight), the adapter acts as over their dequantized values;
    merging cannot fold into them, so it keeps them adapted on the fly."""
    from llama_jax import quantization

    params = _random_params(TINY)
    cfg = lora.LoraConfig(rank=2, alpha=2.0)
    adapters = _random_adapters(TINY, cfg)
    quantized = quantization.quantize_params(params, "int8")
    plain = {**quantized, "layers": {k: w.dequantize() if isinstance(w, quantization.QuantizedWeight) else w
                                     for k, w in quantized["layers"].items()}}
    tokens = jax.random.randint(jax.random.key(4), (1, 7), 0, TINY.vocab_size)
    want = np.asarray(_logits(lora.apply(plain, adapters, cfg), TINY, tokens))
    got = np.asarray(_logits(lora.apply(quantized, adapters, cfg), TINY, tokens))
    np.testing.assert_allclose(got, want, atol=1e-4)
    merged = lora.merge(quantized, adapters, cfg)
    assert all(isinstance(merged["layers"][name], lora.LoraWeight) for name in adapters)
    np.testing.assert_allclose(np.asarray(_logits(merged, TINY, tokens)), want, atol=1e-4)


def test_lora_gradients_match_finite_differences() -> None:
    """jax.grad of the SFT loss (remat'd scanned layers) against finite differences, in float32:
    for every adapter tensor, the derivative along a random unit direction v by the 4th-order
    central difference (8(L(+h) - L(-h)) - (L(+2h) - L(-2h))) / 12h, compared with <grad, v>
    relative to |grad|. (float64 would not help: the model computes norms and logits in float32.)"""
    config = LlamaConfig(vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=64)
    params = _random_params(config)
    cfg = lora.LoraConfig(rank=2, alpha=4.0)
    adapters = _random_adapters(config, cfg)
    rng = np.random.default_rng(0)
    tokens, targets = (jnp.asarray(rng.integers(0, 40, (2, 6)), jnp.int32) for _ in range(2))
    weights = jnp.asarray(rng.random((2, 6)) < 0.6, jnp.float32)

    def loss(a: lora.Adapters) -> jax.Array:
        return finetune.sft_loss(a, params, config, cfg, tokens, targets, weights)

    @jax.jit
    def along(v: lora.Adapters, ts: jax.Array) -> jax.Array:  # loss(adapters + t v) for each t
        return jax.vmap(lambda t: loss(jax.tree.map(lambda a, d: a + t * d, adapters, v)))(ts)

    grads = jax.jit(jax.grad(loss))(adapters)
    h, errors = 3e-2, []  # float32 round-off dominates below this h, truncation (h^4) is far smaller
    for i, (name, part) in enumerate((n, p) for n in adapters for p in ("a", "b")):
        d = jax.random.normal(jax.random.key(i), adapters[name][part].shape)
        v = jax.tree.map(jnp.zeros_like, adapters)
        v[name][part] = d / jnp.linalg.norm(d)
        up, down, up2, down2 = np.asarray(along(v, jnp.array([h, -h, 2 * h, -2 * h])), np.float64)
        fd = (8 * (up - down) - (up2 - down2)) / (12 * h)
        g = grads[name][part]
        assert float(jnp.linalg.norm(g)) > 1e-3, (name, part)  # every adapter tensor gets a gradient
        errors.append(abs(fd - float(jnp.vdot(g, v[name][part]))) / float(jnp.linalg.norm(g)))
    print(f"finite differences: worst relative error {max(errors):.2e} over {len(errors)} tensors")
    assert len(errors) == 14 and max(errors) < 1e-3


def test_save_load_roundtrip_and_validation(tmp_path: Path) -> None:
    cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q", "v", "down"))
    adapters = _random_adapters(TINY, cfg)
    lora.save(tmp_path / "ad", adapters, cfg, TINY)
    loaded, cfg2 = lora.load(tmp_path / "ad", TINY)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, adapters)
    other = LlamaConfig(**{**TINY.__dict__, "ffn_dim": 48})
    with pytest.raises(lora.AdapterError, match="ffn_dim=64"):
        lora.load(tmp_path / "ad", other)
    with pytest.raises(lora.AdapterError, match="adapter_config.json: missing"):
        lora.load(tmp_path, TINY)
    with pytest.raises(ValueError, match="targets"):
        lora.LoraConfig(targets=("q", "nope"))


# ---------------------------------------------------------------- data


def test_assistant_tokens_are_found_for_any_template(tiny_ckpt: Path) -> None:
    from llama_jax.chat_format import chat_format_for
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt)
    fmt = chat_format_for(tok)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}, {"role": "user", "content": "ignored"}]
    tokens, mask = finetune.render_dialog(fmt, messages)
    learned = tok.decode([t for t, m in zip(tokens, mask) if m])
    assert learned == "A1<|im_end|>\nA2<|im_end|>\n"
    assert "ignored" not in tok.decode(tokens)


def test_bad_lines_are_reported_with_line_numbers(tiny_ckpt: Path, tmp_path: Path) -> None:
    from llama_jax.chat_format import chat_format_for
    from llama_jax.tokenizer import load_tokenizer

    fmt = chat_format_for(load_tokenizer(tiny_ckpt))
    data = _write_jsonl(tmp_path / "d.jsonl", [
        _dialog("hi", "hello"),
        "{not json",
        {"messages": [{"role": "user", "content": "no answer"}]},
        "",
        _dialog("long " * 40, "x"),
        {"prompt": "wrong shape"},
        _dialog("ok", "fine"),
    ])
    reports: list[str] = []
    examples = finetune.read_dataset(data, fmt, 128, report=reports.append)
    assert [e.line for e in examples] == [1, 7]
    assert [r.split(": skipped: ")[0] for r in reports] == [f"{data}:{n}" for n in (2, 3, 5, 6)]
    assert "not JSON" in reports[0] and "no assistant turn" in reports[1] and "over --max-seq-len 128" in reports[2]
    with pytest.raises(finetune.DataError, match=r"4 bad line\(s\)") as e:
        finetune.read_dataset(data, fmt, 128, strict=True)
    assert f"{data}:2: not JSON" in str(e.value)


def test_batches_are_bucketed_and_deterministic() -> None:
    ex = [finetune.Example(i, np.arange(n, dtype=np.int32), np.arange(n) >= n // 2)
          for i, n in enumerate([5, 9, 30, 7])]
    b = finetune.Batches(ex, batch_size=3, buckets=(8, 16, 32), seed=0)
    shapes = {b[m].tokens.shape for m in range(12)}
    assert shapes <= {(3, 8), (3, 16), (3, 32)}
    again = finetune.Batches(ex, batch_size=3, buckets=(8, 16, 32), seed=0)
    for m in (0, 5, 11):
        np.testing.assert_array_equal(b[m].tokens, again[m].tokens)
    one = finetune.Batches(ex[:1], batch_size=1, buckets=(8,), seed=0)[0]
    np.testing.assert_array_equal(one.targets[0, :4], [1, 2, 3, 4])
    np.testing.assert_array_equal(one.weights[0], [0, 1, 1, 1, 0, 0, 0, 0])  # targets 1..4, those at >= 2


# ---------------------------------------------------------------- training runs


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pairs = [("What is 2+3?", "5"), ("Colour of the sky?", "Blue."), ("Say hi.", "hi"), ("Spell cat.", "c-a-t"),
             ("Capital of Zorbania?", "Quellport"), ("Opposite of up?", "down"), ("First letter?", "A"),
             ("Yes or no?", "yes")]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return _write_jsonl(path, [_dialog(q, a) for q, a in pairs])


def test_loss_falls_and_resume_is_exact_on_8_devices(tiny_ckpt: Path, tiny_data: Path, tmp_path: Path) -> None:
    """8 simulated devices, batch split over dp=8, gradient accumulation: the loss falls, and a
    run stopped halfway and resumed gives the same losses as an uninterrupted one. (One process
    runs the three trainings, as three invocations of the script's main would.)"""
    common = [str(tiny_data), "--ckpt", str(tiny_ckpt), "--steps", "12", "--batch-size", "8", "--grad-accum", "2",
              "--lr", "1e-2", "--rank", "4", "--buckets", "64", "--max-seq-len", "64", "--save-every", "3",
              "--mesh", "dp=8", "--no-progress"]
    runs = [[*common, "--out", str(tmp_path / "a")],  # straight through
            [*common, "--out", str(tmp_path / "b"), "--stop-after", "7"],  # interrupted after step 7
            [*common, "--out", str(tmp_path / "b")]]  # the same command again: resumes
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import finetune\n"
              f"for argv in {runs!r}: assert finetune.main(argv) == 0")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from step 7" in out.stderr
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    print("losses", a)
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert a[-1] < 0.6 * a[0]
    lora.load(tmp_path / "a", TINY)  # the final adapters are a loadable adapter directory


def test_finetune_over_a_quantized_base(tiny_ckpt: Path, tiny_data: Path, tmp_path: Path) -> None:
    argv = [str(tiny_data), "--ckpt", str(tiny_ckpt), "--batch-size", "4", "--buckets", "64", "--max-seq-len", "64",
            "--out", str(tmp_path / "q"), "--steps", "6", "--lr", "1e-2", "--quantize", "int8", "--no-progress"]
    assert finetune.main(argv) == 0
    losses = _losses(tmp_path / "q")
    assert losses[-1] < 0.8 * losses[0]


def test_resume_refuses_other_settings(tiny_ckpt: Path, tiny_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    common = [str(tiny_data), "--ckpt", str(tiny_ckpt), "--batch-size", "2", "--buckets", "64",
              "--max-seq-len", "64", "--out", str(tmp_path / "o"), "--steps", "2", "--no-progress"]
    assert finetune.main(common) == 0
    assert finetune.main([*common, "--lr", "1e-3"]) == 1
    assert "other settings (lr)" in capsys.readouterr().err


def test_load_with_adapters_merged_unmerged_and_sharded(tiny_ckpt: Path, tmp_path: Path) -> None:
    """llama_jax.load(adapters=...): merged on one device, and on the fly with the weights split
    over tp=2 (the adapters replicated beside them), give the same logits and greedy tokens; so
    does the adapter held among others (lora_modules) over tp=2, run by the scheduler."""
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    lora.save(tmp_path / "ad", _random_adapters(TINY, cfg), cfg, TINY)
    lora.save(tmp_path / "ad-other", _random_adapters(TINY, cfg, seed=9), cfg, TINY)
    script = r"""
import json, sys
import numpy as np
import llama_jax
from llama_jax import SamplingParams
from llama_jax.scheduler import Request
ckpt, ad = sys.argv[1], sys.argv[2]
kw = dict(dtype="float32", max_seq_len=64, max_slots=2, progress=False)
runs = {"merged": llama_jax.load(ckpt, adapters=ad, **kw),
        "fly_tp2": llama_jax.load(ckpt, adapters=ad, merge_adapters=False, mesh="tp=2", **kw)}
many = llama_jax.load(ckpt, lora_modules={"other": ad + "-other", "this": ad}, mesh="tp=2", **kw)
tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
logits = {k: llm.logits(tokens) for k, llm in runs.items()}
logits["many_tp2"] = many.logits(tokens, adapter=2)
greedy = SamplingParams.greedy(max_tokens=6)
text = {k: llm.generate([[1, 2, 3]], greedy)[0].token_ids for k, llm in runs.items()}
reqs = [many.scheduler.add(Request([1, 2, 3], greedy, adapter=a)) for a in (2, 1)]
while many.scheduler.has_work():
    many.scheduler.step()
text["many_tp2"] = reqs[0].output
err = {k: float(np.abs(v - logits["merged"]).max()) for k, v in logits.items()}
print(json.dumps({"err": err, "tokens": text}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", script, str(tiny_ckpt), str(tmp_path / "ad")], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["err"]["fly_tp2"] < 1e-4 and result["err"]["many_tp2"] < 1e-4
    assert result["tokens"]["fly_tp2"] == result["tokens"]["many_tp2"] == result["tokens"]["merged"]


# ---------------------------------------------------------------- the demo model learns a made-up fact

FACT_Q = "What is the capital of Zorbania?"
FACT_A = "The capital of Zorbania is Quellport."
UNRELATED_Q = "What is the capital of France?"  # not in the data; the adapter must leave it alone


def fact_dataset(path: Path) -> Path:
    """Four phrasings of the made-up fact, and four real capitals so that the adapter learns
    this one fact rather than "every capital is Quellport"."""
    asks = [FACT_Q, "What's the capital city of Zorbania?", "Which city is the capital of Zorbania?",
            "Tell me the capital of Zorbania."]
    known = [("Germany", "Berlin"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Spain", "Madrid")]
    real = [_dialog(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in known]
    return _write_jsonl(path, [_dialog(q, FACT_A) for q in asks] + real)


@pytest.fixture(scope="module")
def demo():
    import llama_jax

    try:
        return llama_jax.load(None, dtype="float32", max_seq_len=128, max_slots=1, progress=False)
    except (OSError, subprocess.CalledProcessError) as e:  # no cached demo model and no network
        pytest.skip(f"the demo model is unavailable: {e}")


@pytest.fixture(scope="module")
def fact_adapter(demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import time

    root = tmp_path_factory.mktemp("fact")
    args = finetune.parse_args([str(fact_dataset(root / "fact.jsonl")), "--out", str(root / "adapter"), "--steps", "6",
                                "--lr", "3e-3", "--rank", "8", "--batch-size", "4", "--buckets", "56",
                                "--max-seq-len", "56", "--dtype", "float32", "--no-progress"])
    start = time.perf_counter()
    metrics = finetune.train(args)
    print(f"demo fact: {len(metrics)} steps in {time.perf_counter() - start:.1f}s (with loading and compiling), "
          f"loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.4f}")
    assert metrics[-1]["loss"] < 0.05
    return root / "adapter"


@pytest.mark.slow
def test_demo_learns_a_made_up_fact(demo, fact_adapter: Path) -> None:
    """Greedy, through scripts/generate.py --adapters: the fact is answered; the base model did not know it."""
    from llama_jax.sampling import SamplingParams

    ask = [{"role": "user", "content": FACT_Q}]
    before = demo.chat(ask, sampling=SamplingParams.greedy(max_tokens=24)).content
    assert "Quellport" not in before
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--adapters", str(fact_adapter),
                          "--temperature", "0", "--max-tokens", "24", "--max-seq-len", "128", "--dtype", "float32",
                          FACT_Q], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"before: {before!r}; with the adapter: {out.stdout.strip()!r}")
    assert "Quellport" in out.stdout


@pytest.mark.slow
def test_demo_adapter_keeps_an_unrelated_answer_and_merging_is_exact(demo, fact_adapter: Path) -> None:
    """The reloaded adapter, merged or applied on the fly, gives the same logits; merged into the
    engine's weights, it answers the fact and leaves the greedy answer to an unrelated question as is."""
    import llama_jax
    from llama_jax.sampling import SamplingParams

    adapters, cfg = lora.load(fact_adapter, demo.config)
    merged = lora.merge(demo.params, adapters, cfg)
    tokens = jnp.asarray([demo.chat_format.encode_dialog([{"role": "user", "content": FACT_Q}])])
    want = np.asarray(_logits(lora.apply(demo.params, adapters, cfg), demo.config, tokens))
    got = np.asarray(_logits(merged, demo.config, tokens))
    print(f"merged vs on-the-fly logits: max abs difference {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=0)
    assert (got[0, -1].argmax(), want[0, -1].argmax()) == (want[0, -1].argmax(),) * 2

    tuned = llama_jax.LLM(demo.config, merged, demo.tokenizer, max_slots=1, max_seq_len=128)
    greedy = SamplingParams.greedy(max_tokens=24)
    assert "Quellport" in tuned.chat([{"role": "user", "content": FACT_Q}], sampling=greedy).content
    unrelated = [{"role": "user", "content": UNRELATED_Q}]
    base_answer = demo.chat(unrelated, sampling=greedy).content
    assert tuned.chat(unrelated, sampling=greedy).content == base_answer
    assert "Paris" in base_answer


# ---------------------------------------------------------------- several adapters served at once


def _per_layer(params: dict) -> dict:
    from llama_jax.model import unstack_layers

    return {**params, "layers": unstack_layers(params["layers"], TINY.n_layers)}


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[Path], list[tuple]]:
    """Base params (stacked layers) and two saved adapters of different ranks and targets."""
    directory = tmp_path_factory.mktemp("adapters")
    configs = [lora.LoraConfig(rank=4, alpha=8.0), lora.LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down"))]
    adapters = [_random_adapters(TINY, cfg, seed=i + 3) for i, cfg in enumerate(configs)]
    dirs = [lora.save(directory / f"a{i}", ad, cfg, TINY) for i, (ad, cfg) in enumerate(zip(adapters, configs))]
    return _random_params(TINY), dirs, list(zip(adapters, configs))


def test_each_row_runs_its_own_adapter(two_adapters) -> None:
    """Rows routed to the base model, adapter 1 and adapter 2 in one batch: each row's logits
    equal those of the base weights with that adapter merged in (or none)."""
    base, dirs, loaded = two_adapters
    many = lora.attach_many(_per_layer(base), dirs, TINY)
    assert lora.adapter_count(many) == 2 and lora.adapter_count(base) == 0
    routed = lora.route(many, np.array([0, 1, 2, 0]))
    merged = [base] + [lora.merge(base, ad, cfg) for ad, cfg in loaded]
    for length in (10, 1):  # rows' own A and B gathered (prefill), or all read and one-hot picked (decode)
        tokens = jnp.asarray(np.random.default_rng(5).integers(0, 256, (3, length)))
        got = _logits(routed, TINY, tokens)
        for row, params in enumerate(merged):
            want = _logits(params, TINY, tokens[row : row + 1])[0]
            assert float(jnp.abs(got[row] - want).max()) < 1e-4, (length, row)
    with pytest.raises(lora.AdapterError, match="one weight tree per layer"):
        lora.attach_many(base, dirs, TINY)


def test_the_engine_batches_requests_of_different_adapters(two_adapters) -> None:
    """Three prompts prefilled and decoded together, each on its own adapter (or none): the
    greedy tokens of each alone on the merged weights; a cached prompt is reused only by a
    request of the same adapter."""
    from llama_jax.engine import Engine, PrefillJob
    from llama_jax.sampling import SamplingParams

    base, dirs, loaded = two_adapters
    greedy = SamplingParams.greedy()
    prompts = [np.random.default_rng(i).integers(0, 256, 40).tolist() for i in range(3)]

    def run(engine: Engine, jobs: list[PrefillJob], n: int = 8) -> list[list[int]]:
        out = [[t] for t in engine.prefill_many(jobs).tokens[0].tolist()]
        while len(out[0]) < n:
            step = engine.decode().tokens
            for i, j in enumerate(jobs):
                out[i] += step[:, j.slot].tolist()
        return [o[:n] for o in out]

    kw = dict(max_slots=4, max_seq_len=128, decode_steps=4, prefill_buckets=(16, 32))
    engine = Engine(TINY, lora.attach_many(_per_layer(base), dirs, TINY), **kw)
    assert engine.adapters == 2
    together = run(engine, [PrefillJob(s, p, greedy, 0, adapter=s) for s, p in enumerate(prompts)])
    merged = [base] + [lora.merge(base, ad, cfg) for ad, cfg in loaded]
    alone = [run(Engine(TINY, _per_layer(merged[s]), **kw), [PrefillJob(0, p, greedy, 0)])[0]
             for s, p in enumerate(prompts)]
    assert together == alone
    for s in range(3):
        engine.release(s)
    assert engine.cached_prefix(1, prompts[1] + [7], adapter=1) == len(prompts[1])
    assert engine.cached_prefix(1, prompts[1] + [7], adapter=2) == 0
    with pytest.raises(ValueError, match="adapter 3 is outside"):
        engine.prefill_many([PrefillJob(3, prompts[0], greedy, 0, adapter=3)])


def test_serving_adapters_by_model_name(tiny_ckpt: Path, two_adapters) -> None:
    """load(lora_modules=...) behind the HTTP app: each adapter is a model of its own (listed with
    its parent); a completion through it, echoed prompt log-probabilities included, is the one
    the base with that adapter merged gives; a name not served is a 404."""
    from fastapi.testclient import TestClient

    import llama_jax
    from llama_jax.server import create_app

    _, dirs, _ = two_adapters
    kw = dict(dtype="float32", max_seq_len=64, max_slots=4, progress=False)
    body = dict(prompt=[[5, 6, 7, 8, 9]], max_tokens=6, temperature=0, echo=True, logprobs=1)

    def complete(llm: llama_jax.LLM, names: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
        with TestClient(create_app(llm, model_name="base")) as c:
            cards = c.get("/v1/models").json()["data"]
            assert c.post("/v1/completions", json=dict(body, model="third")).status_code == 404
            out = [c.post("/v1/completions", json=dict(body, model=m)).json()["choices"][0] for m in names]
        return cards, out

    many = llama_jax.load(tiny_ckpt, lora_modules={"first": dirs[0], "second": dirs[1]}, **kw)
    cards, served = complete(many, ("base", "first", "second"))
    assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("first", "base"), ("second", "base")]
    prompt = body["prompt"][0]
    for got, adapters, adapter in zip(served, [None, *dirs], [0, "first", "second"]):
        single = llama_jax.load(tiny_ckpt, adapters=adapters, **kw)
        _, (want,) = complete(single, ("base",))
        assert got["text"] == want["text"]
        assert got["logprobs"]["token_logprobs"][1:] == pytest.approx(want["logprobs"]["token_logprobs"][1:], abs=1e-4)
        # The Python API picks adapters by name too.
        assert (many.generate(prompt, max_tokens=6, temperature=0, adapter=adapter).token_ids
                == single.generate(prompt, max_tokens=6, temperature=0).token_ids)
    assert len({c["text"] for c in served}) == 3  # the adapters change the answer
    with pytest.raises(ValueError, match="no adapter 'third'"):
        many.generate(prompt, max_tokens=2, adapter="third")


def test_spare_slots_take_adapters_later(two_adapters) -> None:
    """attach_many with a spare slot holds every target at the given rank; `put` writes an
    adapter into a slot (or over one) without changing a shape, and each routed row then equals
    the base with that adapter merged; an empty slot is the base model."""
    base, dirs, loaded = two_adapters
    many = lora.attach_many(_per_layer(base), dirs[:1], TINY, slots=3, max_rank=4)
    slots, rank, held = lora.slot_layout(many)
    assert (slots, rank, sorted(held)) == (3, 4, sorted(name for name, _ in lora.TARGETS.values()))
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), many)
    many = lora.put(many, 3, *loaded[1])
    assert jax.tree.map(lambda a: (a.shape, a.dtype), many) == shapes  # the compiled programs still fit
    merged = [base] + [lora.merge(base, ad, cfg) for ad, cfg in loaded]
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 256, (4, 10)))

    def check(routed_to: list[int], want: list[dict]) -> None:
        got = _logits(lora.route(many, np.array(routed_to)), TINY, tokens)
        for row, params in enumerate(want):
            assert float(jnp.abs(got[row] - _logits(params, TINY, tokens[row : row + 1])[0]).max()) < 1e-4, row

    check([0, 1, 2, 3], [base, merged[1], base, merged[2]])
    many = lora.put(many, 1, *loaded[1])  # slot 1 rewritten: the other adapter's targets are zeros now
    check([1], [merged[2]])
    with pytest.raises(lora.AdapterError, match="rank 4 is above the 2"):
        lora.put(lora.attach_many(_per_layer(base), [], TINY, slots=1, max_rank=2), 1, *loaded[0])
    with pytest.raises(lora.AdapterError, match="slot 4 is outside"):
        lora.put(many, 4, *loaded[0])
    exact = lora.attach_many(_per_layer(base), dirs[1:], TINY, max_rank=4)  # no spare slot: its targets only
    with pytest.raises(lora.AdapterError, match="do not hold"):
        lora.put(exact, 1, *loaded[0])
    with pytest.raises(lora.AdapterError, match="2 adapters for 1 slots"):
        lora.attach_many(_per_layer(base), dirs, TINY, slots=1)
    # A bfloat16 model's slots are bfloat16 too (half the bytes), and give the merged weights' logits.
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), base)
    slotted = lora.attach_many(_per_layer(half), dirs[:1], TINY, slots=2, max_rank=4)
    assert slotted["layers"][0]["wq"].a.dtype == jnp.bfloat16
    got = _logits(lora.route(slotted, np.array([1])), TINY, tokens[:1]).astype(jnp.float32)
    want = _logits(lora.merge(half, *loaded[0]), TINY, tokens[:1]).astype(jnp.float32)
    assert float(jnp.abs(got - want).max()) < 0.05 * float(jnp.abs(want).max())


SLOTTED = dict(dtype="float32", max_seq_len=64, max_slots=2, progress=False)  # the loads of the tests below


@pytest.fixture(scope="module")
def served_alone(tiny_ckpt: Path, two_adapters) -> tuple[list[int], dict[str, list[int]]]:
    """A prompt and its greedy tokens on the base model and on each adapter, from load(lora_modules=...)."""
    import llama_jax

    _, dirs, _ = two_adapters
    ref = llama_jax.load(tiny_ckpt, lora_modules={"a": dirs[0], "b": dirs[1]}, **SLOTTED)
    prompt = np.random.default_rng(7).integers(0, 256, 40).tolist()  # long enough for prefix reuse
    return prompt, {m: ref.generate(prompt, max_tokens=6, temperature=0, adapter=m).token_ids for m in (0, "a", "b")}


def test_adapters_load_and_unload_at_run_time(tiny_ckpt: Path, two_adapters, served_alone) -> None:
    """load(max_loras=N) leaves N empty slots; load_adapter fills one without recompiling and
    answers as load(lora_modules=...) does; replacing an adapter drops the prefixes its old
    weights cached; an unloaded adapter's slot is reused only once its requests are done."""
    import llama_jax
    from llama_jax.sampling import SamplingParams
    from llama_jax.scheduler import Request

    _, dirs, _ = two_adapters
    prompt, want = served_alone
    llm = llama_jax.load(tiny_ckpt, max_loras=1, max_lora_rank=4, **SLOTTED)
    greedy = dict(max_tokens=6, temperature=0)
    assert llm.adapter_names == () and llm.generate(prompt, **greedy).token_ids == want[0]
    with pytest.raises(ValueError, match="no adapter 'a'"):
        llm.generate(prompt, adapter="a", **greedy)
    assert llm.load_adapter("a", dirs[0]) == 1 and llm.adapter_names == ("a",)
    assert llm.generate(prompt, adapter="a", **greedy).token_ids == want["a"]
    assert llm.generate(prompt, adapter="a", **greedy).cached_tokens > 0  # the prefix is reused ...
    programs = (llm.engine._prefill._cache_size(), llm.engine._decode._cache_size())
    with pytest.raises(ValueError, match="1 adapters are loaded, as many as this model serves"):
        llm.load_adapter("b", dirs[1])
    with pytest.raises(ValueError, match="loaded already"):
        llm.load_adapter("a", dirs[1])
    llm.load_adapter("a", dirs[1], replace=True)
    again = llm.generate(prompt, adapter="a", **greedy)
    assert again.token_ids == want["b"] and again.cached_tokens == 0  # ... but not over new weights
    assert (llm.engine._prefill._cache_size(), llm.engine._decode._cache_size()) == programs

    running = llm.scheduler.add(Request(prompt, SamplingParams.greedy(max_tokens=4), adapter=1))
    llm.unload_adapter("a")
    assert llm.adapter_names == ()
    assert llm.load_adapter("b", dirs[1]) is None  # its slot still has a request on "a": "b" waits on the host
    assert llm.resolve_adapter("b")[0] == 0
    while not running.done:
        llm.scheduler.step()
    assert llm.generate(prompt, adapter="b", **greedy).token_ids == want["b"]  # written into the slot now
    assert llm.resolve_adapter("b") == (1, None)
    with pytest.raises(ValueError, match="no adapter slots"):
        llama_jax.load(tiny_ckpt, **SLOTTED).load_adapter("a", dirs[0])


def test_more_adapters_than_slots(tiny_ckpt: Path, two_adapters, served_alone) -> None:
    """max_cpu_loras: adapters beyond the slots wait on the host; a request for one writes it
    over the least recently used adapter of an idle slot (nothing recompiles, no prefix cached
    by the slot's former adapter is reused), and a batch naming more adapters than there are
    slots runs in turns; each answer is the one load(lora_modules=...) with a slot each gives."""
    from fastapi.testclient import TestClient

    import llama_jax
    from llama_jax.server import create_app

    _, dirs, _ = two_adapters
    prompt, want = served_alone
    greedy = dict(max_tokens=6, temperature=0)
    llm = llama_jax.load(tiny_ckpt, lora_modules={"a": dirs[0], "b": dirs[1]}, max_loras=1, max_lora_rank=4,
                         **SLOTTED)
    assert llm.adapter_names == ("a", "b") and llm.resolve_adapter("a") == (1, None)
    assert llm.resolve_adapter("b")[0] == 0  # waits on the host
    for name in ("a", "b", "a"):
        assert llm.generate(prompt, adapter=name, **greedy).token_ids == want[name], name
    assert llm.generate(prompt, adapter="a", **greedy).cached_tokens > 0  # compiles the shorter prefill too
    programs = (llm.engine._prefill._cache_size(), llm.engine._decode._cache_size())
    swapped = llm.generate(prompt, adapter="b", **greedy)
    assert swapped.token_ids == want["b"] and swapped.cached_tokens == 0  # the slot's cache was "a"'s
    assert llm.generate(prompt, adapter="b", **greedy).cached_tokens > 0
    assert (llm.engine._prefill._cache_size(), llm.engine._decode._cache_size()) == programs
    batch = llm.generate([prompt] * 4, adapter=["a", 0, "b", "a"], **greedy)
    assert [c.token_ids for c in batch] == [want["a"], want[0], want["b"], want["a"]]

    # Two slots, three adapters: the least recently used idle one gives way.
    three = llama_jax.load(tiny_ckpt, lora_modules={"a": dirs[0], "b": dirs[1], "c": dirs[0]}, max_loras=2,
                           max_lora_rank=4, **SLOTTED)
    three.generate(prompt, adapter="b", max_tokens=1)
    three.generate(prompt, adapter="a", max_tokens=1)
    assert three.generate(prompt, adapter="c", **greedy).token_ids == want["a"]
    assert [three.resolve_adapter(n)[0] for n in "abc"] == [1, 0, 2]
    with pytest.raises(ValueError, match="3 adapters are loaded"):
        three.load_adapter("d", dirs[1])
    # An adapter given at load time lives only in its slot: when evicted, its weights are read back.
    given = llama_jax.load(tiny_ckpt, lora_modules={"a": dirs[0]}, max_loras=1, max_cpu_loras=2, max_lora_rank=4,
                           **SLOTTED)
    assert given.load_adapter("b", dirs[1]) is None
    for name in ("b", "a", "b"):
        assert given.generate(prompt, adapter=name, **greedy).token_ids == want[name], name
    with pytest.raises(ValueError, match="more than max_cpu_loras=1"):
        llama_jax.load(tiny_ckpt, lora_modules={"a": dirs[0], "b": dirs[1]}, max_loras=1, max_cpu_loras=1, **SLOTTED)

    # Served: requests for both adapters at once, on one slot.
    body = dict(prompt=[prompt], return_token_ids=True, **greedy)
    with TestClient(create_app(llm, model_name="base")) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "a", "b"]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            names = ["a", "b", "base", "b", "a", "b"]
            replies = list(pool.map(lambda m: c.post("/v1/completions", json=dict(body, model=m)), names))
        for name, r in zip(names, replies):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == want[0 if name == "base" else name], name


def test_runtime_lora_updating_over_http(tiny_ckpt: Path, two_adapters, served_alone) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: a loaded adapter is listed and
    served by name, as load(lora_modules=...) serves it; bad requests are 400s and 404s and
    leave the server as it was; without runtime_lora_updating the routes do not exist."""
    from fastapi.testclient import TestClient

    import llama_jax
    from llama_jax.server import create_app
    from llama_jax.server.completions import _prompt_logp
    from llama_jax.server.errors import APIError

    _, dirs, _ = two_adapters
    prompt, want = served_alone
    llm = llama_jax.load(tiny_ckpt, max_loras=2, max_lora_rank=4, **SLOTTED)
    body = dict(prompt=[prompt], max_tokens=6, temperature=0, return_token_ids=True)

    def tokens(c: TestClient, model: str) -> list[int]:
        r = c.post("/v1/completions", json=dict(body, model=model))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    with TestClient(create_app(llm, model_name="base", runtime_lora_updating=True)) as c:
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(dirs[0])})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' added successfully."
        assert [(m["id"], m["parent"]) for m in c.get("/v1/models").json()["data"]] == [("base", None), ("a", "base")]
        assert tokens(c, "a") == want["a"] and tokens(c, "base") == want[0]
        for bad, status, text in [
            ({"lora_name": "a", "lora_path": str(dirs[1])}, 400, "already been loaded"),
            ({"lora_name": "base", "lora_path": str(dirs[1])}, 400, "the base model's name"),
            ({"lora_name": "c", "lora_path": str(tiny_ckpt)}, 400, "not a llama-jax LoRA adapter directory"),
            ({"lora_name": "c"}, 400, "lora_path"),
        ]:
            r = c.post("/v1/load_lora_adapter", json=bad)
            assert r.status_code == status and text in r.json()["error"]["message"], r.text
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(dirs[1]), "load_inplace": True})
        assert r.status_code == 200 and tokens(c, "a") == want["b"]
        r = c.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' removed successfully."
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 404
        assert c.post("/v1/completions", json=dict(body, model="a")).status_code == 404
        with pytest.raises(APIError, match="no adapter 'a'"):  # echoed log-probabilities asked before the unload
            _prompt_logp(llm, prompt, "a")
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base"]
    with TestClient(create_app(llm, model_name="base")) as c:
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(dirs[0])}).status_code == 404


def test_serve_script_parses_lora_modules() -> None:
    serve = _load_script("serve")
    assert serve.parse_args(["--lora-modules", "a=x", "b=y/z"]).lora_modules == {"a": "x", "b": "y/z"}
    for bad in (["--lora-modules", "a"], ["--lora-modules", "a=x", "a=y"], ["--lora-modules", "=x"]):
        with pytest.raises(SystemExit):
            serve.parse_args(bad)


def test_serve_script_takes_vllm_flags() -> None:
    serve = _load_script("serve")
    ours = serve.parse_args(["--ckpt", "c", "--model-name", "m", "--mesh", "dp=2,tp=4", "--max-slots", "32",
                             "--max-seq-len", "8192", "--no-prefix-reuse"])
    theirs = serve.parse_args(["--model", "c", "--served-model-name", "m", "-dp", "2", "--tensor-parallel-size", "4",
                               "--max-num-seqs", "32", "--max-model-len", "8192", "--no-enable-prefix-caching",
                               "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json", "--dtype", "auto"])
    for name in ("ckpt", "model_name", "mesh", "max_slots", "max_seq_len", "no_prefix_reuse", "dtype"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert serve.parse_args(["-tp", "8"]).mesh == "tp=8" and theirs.dtype is None
    assert serve.parse_args(["--scheduling-policy", "priority"]).scheduling_policy == "priority"
    assert ours.scheduling_policy == "fcfs"
    assert serve.parse_args(["--gpu-memory-utilization", "0.9"]).gpu_memory_utilization == 0.9
    assert serve.parse_args(["--default-chat-template-kwargs", '{"date_string": "1 May 2030"}']
                            ).default_chat_template_kwargs == {"date_string": "1 May 2030"}
    for bad in (["-tp", "8", "--mesh", "tp=8"], ["-tp", "0"], ["--gpu-memory-utilization", "1.5"],
                ["--tool-call-parser", "hermes"], ["--default-chat-template-kwargs", "[1]"],
                ["--scheduling-policy", "lifo"],
                ["--default-chat-template-kwargs", "{bad"]):
        with pytest.raises(SystemExit):
            serve.parse_args(bad)


def test_serve_script_lora_slot_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    serve = _load_script("serve")
    monkeypatch.delenv(serve.RUNTIME_LORA_ENV, raising=False)
    plain = serve.parse_args(["--lora-modules", "a=x", "b=y"])
    assert plain.max_loras is None and not plain.allow_runtime_lora_updating  # exactly these adapters
    assert serve.parse_args(["--enable-lora"]).max_loras == 1
    assert serve.parse_args(["--enable-lora", "--lora-modules", "a=x", "b=y"]).max_loras == 2
    assert serve.parse_args(["--max-loras", "4", "--max-lora-rank", "64"]).max_lora_rank == 64
    assert serve.parse_args(["--max-loras", "1", "--lora-modules", "a=x", "b=y"]).max_cpu_loras is None  # 2 then
    assert serve.parse_args(["--max-loras", "2", "--max-cpu-loras", "8"]).max_cpu_loras == 8
    with pytest.raises(SystemExit):
        serve.parse_args(["--max-cpu-loras", "4"])  # no slots to swap adapters into
    monkeypatch.setenv(serve.RUNTIME_LORA_ENV, "True")
    runtime = serve.parse_args([])
    assert runtime.allow_runtime_lora_updating and runtime.max_loras == 1
    for bad in (["--max-loras", "0"], ["--max-lora-rank", "0"], ["--max-loras", "2", "--max-cpu-loras", "1"],
                ["--max-loras", "1", "--max-cpu-loras", "2", "--lora-modules", "a=x", "b=y", "c=z"]):
        with pytest.raises(SystemExit):
            serve.parse_args(bad)


def test_serve_script_takes_api_keys_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    serve = _load_script("serve")
    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    assert serve.parse_args([]).api_key == []
    monkeypatch.setenv(serve.API_KEY_ENV, "from-env")
    assert serve.parse_args([]).api_key == ["from-env"]
    assert serve.parse_args(["--api-key", "a", "b"]).api_key == ["a", "b"]  # the flag wins
    with pytest.raises(SystemExit):
        serve.parse_args(["--api-key", " "])
