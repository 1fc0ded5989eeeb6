#!/usr/bin/env python
"""Supervised LoRA fine-tuning on chat data; the base model stays frozen.

    python scripts/finetune.py data.jsonl --out adapters/mine --steps 200        # the demo model
    python scripts/finetune.py data.jsonl --ckpt ckpt/llama3.1-8b-instruct --out adapters/mine \\
        --batch-size 8 --grad-accum 4 --mesh dp=8 [--quantize int8]
    python scripts/generate.py --adapters adapters/mine "a question from the data"

The data is JSONL, one OpenAI-style dialog per line: {"messages": [{"role": "user", ...},
{"role": "assistant", ...}], "tools": [...] (optional)}. Dialogs are rendered with the
checkpoint's own chat format; the loss covers the assistant turns' tokens only (their end
token included, so the model learns to stop). A line that is not JSON, a dialog without an
assistant turn or one longer than --max-seq-len is reported with its line number and skipped,
or, with --strict, the run stops before training.

Sequences are padded to a bucket length (--buckets) so training compiles once per bucket. The
batch is split over the mesh's dp axis. Every --save-every steps, OUT/checkpoints/<step> holds
the adapters, the optimizer state and the position in the data; running the same command again
resumes from the latest one and continues the same loss curve. At the end (or at
--stop-after) the adapters are written to OUT (adapter_config.json, weights/), loadable with
`llama_jax.load(path, adapters=OUT)` or `--adapters OUT`; OUT/metrics.jsonl has the loss per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_jax  # noqa: E402
from llama_jax import lora, quantization  # noqa: E402
from llama_jax.chat_format import chat_format_for  # noqa: E402
from llama_jax.lora import TARGETS, LoraConfig  # noqa: E402
from llama_jax.model import forward  # noqa: E402
from llama_jax.sharding import ModelShardings, make_mesh  # noqa: E402
from llama_jax.sources import resolve_checkpoint  # noqa: E402
from llama_jax.tokenizer import load_tokenizer  # noqa: E402

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
# Settings that shape the training trajectory: a resumed run must use the same ones.
TRAJECTORY_ARGS = ("ckpt", "rank", "alpha", "targets", "steps", "batch_size", "grad_accum", "lr", "warmup_steps",
                   "min_lr_ratio", "weight_decay", "clip", "max_seq_len", "buckets", "seed", "dtype", "quantize")


class DataError(ValueError):
    """A dataset line that cannot be trained on."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="JSONL file of {\"messages\": [...]} dialogs")
    p.add_argument("--out", type=Path, required=True, help="output directory (adapters, checkpoints, metrics)")
    p.add_argument("--ckpt", help="base checkpoint: llama-jax, HF dir, Meta dir or .gguf (default: the demo model)")
    lo = p.add_argument_group("adapters")
    lo.add_argument("--rank", type=int, default=8)
    lo.add_argument("--alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    lo.add_argument("--targets", default=",".join(TARGETS), help=f"projections to adapt (default: {','.join(TARGETS)})")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=100, help="optimizer steps (the schedule's length)")
    o.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch, over all devices")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    o.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to lr * this")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--clip", type=float, default=1.0, help="clip gradients to this global norm (0: off)")
    o.add_argument("--seed", type=int, default=0, help="adapter initialisation and data order")
    d = p.add_argument_group("data")
    d.add_argument("--max-seq-len", type=int, default=2048, help="longer dialogs are bad data")
    d.add_argument("--buckets", help="padded lengths, comma-separated (default: powers of two from 64, and the max)")
    d.add_argument("--strict", action="store_true", help="reject the dataset if any line is bad, instead of skipping")
    r = p.add_argument_group("runtime")
    r.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    r.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    r.add_argument("--stop-after", type=int, help="stop after this many steps in all (resume later)")
    r.add_argument("--mesh", help='device mesh, e.g. "dp=8" (default: dp over all devices)')
    r.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="of the frozen base (default: bfloat16 on GPU, float32 on CPU)")
    r.add_argument("--quantize", choices=["int8", "fp8"], help="quantize the frozen base while loading (less memory)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("rank", "steps", "batch_size", "grad_accum", "max_seq_len", "save_every", "keep"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.clip < 0 or args.weight_decay < 0 or not 0 <= args.min_lr_ratio <= 1:
        p.error("--lr must be > 0, --clip and --weight-decay >= 0, --min-lr-ratio in [0, 1]")
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 20)
    if not 0 <= args.warmup_steps < args.steps:
        p.error("--warmup-steps must be in [0, --steps)")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        p.error("--stop-after must be in [1, --steps]")
    try:
        args.lora = LoraConfig(args.rank, args.alpha, tuple(t.strip() for t in args.targets.split(",") if t.strip()))
        args.bucket_list = parse_buckets(args.buckets, args.max_seq_len)
    except ValueError as e:
        p.error(str(e))
    return args


def parse_buckets(spec: str | None, max_len: int) -> tuple[int, ...]:
    if spec is None:
        sizes = [b for b in (64 << i for i in range(20)) if b < max_len] + [max_len]
    else:
        try:
            sizes = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--buckets {spec!r}: expected comma-separated integers") from None
        if not sizes or min(sizes) < 2:
            raise ValueError(f"--buckets {spec!r}: lengths must be >= 2")
        if max(sizes) < max_len:
            raise ValueError(f"--buckets {spec!r}: the largest must cover --max-seq-len ({max_len})")
    return tuple(sorted(set(sizes)))


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class Example:
    line: int
    tokens: np.ndarray  # (n,) int32
    mask: np.ndarray  # (n,) bool: the token belongs to an assistant turn (a training target)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def render_dialog(
    chat_format: Any, messages: list[dict], tools: list[dict] | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of a dialog and which of them are the assistant's, for any chat template.

    Turn i's tokens are those after the rendering of messages[:i] with the generation prompt
    and up to the rendering of messages[:i+1]; both are compared to the whole dialog by common
    prefix, since a template may tokenize a boundary differently inside a longer text."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError("no assistant turn")
    if last == 0:
        raise DataError("the dialog opens with an assistant turn: nothing precedes it to condition on")
    messages = messages[: last + 1]  # later turns teach nothing
    tokens = chat_format.encode_dialog(messages, tools, add_generation_prompt=False)
    mask = [False] * len(tokens)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = _common_prefix(tokens, chat_format.encode_dialog(messages[:i], tools, add_generation_prompt=True))
        end = _common_prefix(tokens, chat_format.encode_dialog(messages[: i + 1], tools, add_generation_prompt=False))
        if end <= start:
            raise DataError(f"assistant message {i} renders to no tokens")
        mask[start:end] = [True] * (end - start)
    return tokens, mask


def parse_line(text: str) -> tuple[list[dict], list[dict] | None]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError('expected an object with a "messages" list')
    if not all(isinstance(m, dict) for m in record["messages"]):
        raise DataError("every message must be an object")
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError('"tools" must be a list')
    return record["messages"], tools


def read_dataset(path: Path, chat_format: Any, max_len: int, *, strict: bool = False,
                 report: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[Example]:
    """The trainable dialogs of a JSONL file. Each bad line is reported (`path:line: reason`) and
    skipped; with `strict`, a DataError listing them is raised instead. Blank lines are ignored."""
    examples: list[Example] = []
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                messages, tools = parse_line(text)
                try:
                    tokens, mask = render_dialog(chat_format, messages, tools)
                except (ValueError, TypeError) as e:  # the chat format's own checks (ChatTemplateError, ...)
                    raise DataError(str(e)) from None
                if len(tokens) > max_len:
                    raise DataError(f"{len(tokens)} tokens, over --max-seq-len {max_len}")
            except DataError as e:
                problems.append(f"{path}:{n}: {e}")
                if not strict:
                    report(f"{path}:{n}: skipped: {e}")
                continue
            examples.append(Example(n, np.asarray(tokens, np.int32), np.asarray(mask, bool)))
    if strict and problems:
        raise DataError(f"{len(problems)} bad line(s) (--strict):\n" + "\n".join(problems))
    if not examples:
        raise DataError(f"{path}: no trainable dialog")
    return examples


@dataclasses.dataclass
class Batch:
    tokens: np.ndarray  # (B, T) int32 model input, padded
    targets: np.ndarray  # (B, T) int32: the next token
    weights: np.ndarray  # (B, T) float32: 1 where the next token is an assistant token
    n_tokens: int  # real (unpadded) tokens


class Batches:
    """Micro-batch m of an endless stream: each epoch is a permutation of the examples drawn from
    (seed, epoch), so batch m depends on m alone and a resumed run sees the same data."""

    def __init__(self, examples: list[Example], batch_size: int, buckets: tuple[int, ...], seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.buckets = buckets
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))}
        return self._orders[epoch]

    def __getitem__(self, m: int) -> Batch:
        n = len(self.examples)
        stream = range(m * self.batch_size, (m + 1) * self.batch_size)  # positions in the endless stream
        picked = [self.examples[self._order(s // n)[s % n]] for s in stream]
        longest = max(len(e.tokens) for e in picked)
        t = next(b for b in self.buckets if b >= longest)
        tokens = np.zeros((self.batch_size, t), np.int32)
        targets = np.zeros((self.batch_size, t), np.int32)
        weights = np.zeros((self.batch_size, t), np.float32)
        for row, e in enumerate(picked):
            k = len(e.tokens)
            tokens[row, :k] = e.tokens
            targets[row, : k - 1] = e.tokens[1:]
            weights[row, : k - 1] = e.mask[1:]
        return Batch(tokens, targets, weights, sum(len(e.tokens) for e in picked))


# ---------------------------------------------------------------- training


def lr_schedule(args: argparse.Namespace) -> Callable[[Any], Any]:
    """The learning rate of optimizer step i (0-based): a linear warm-up reaching --lr at step
    --warmup-steps - 1, then a cosine decay reaching lr * --min-lr-ratio at the last step."""
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=args.lr, warmup_steps=args.warmup_steps, decay_steps=args.steps,
        end_value=args.lr * args.min_lr_ratio,
    )
    return lambda i: base(i + 1)  # base(0) = 0 would waste the first step


def make_optimizer(args: argparse.Namespace) -> Any:
    """AdamW on a warm-up + cosine schedule, after global-norm clipping; MultiSteps accumulates
    --grad-accum micro-batch gradients (their mean) into one update."""
    parts = [optax.clip_by_global_norm(args.clip)] if args.clip > 0 else []
    opt = optax.chain(*parts, optax.adamw(lr_schedule(args), weight_decay=args.weight_decay))
    return optax.MultiSteps(opt, every_k_schedule=args.grad_accum) if args.grad_accum > 1 else opt


def sft_loss(adapters: lora.Adapters, params: Any, config: Any, lora_config: LoraConfig, tokens: jax.Array,
             targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy of the adapted model over the weighted (assistant) target tokens."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = forward(lora.apply(params, adapters, lora_config), config, tokens, positions, None, remat=True)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_train_step(config: Any, lora_config: LoraConfig, optimizer: Any, shardings: ModelShardings) -> Callable:
    """A jitted micro-step (adapters, opt_state, params, tokens, targets, weights) -> (adapters,
    opt_state, loss): base params as the model's shardings say, adapters and optimizer state
    replicated, the batch split over dp (the gradient mean over dp is XLA's all-reduce)."""

    def step(adapters, opt_state, params, tokens, targets, weights):
        loss, grads = jax.value_and_grad(sft_loss)(adapters, params, config, lora_config, tokens, targets, weights)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    rep, rows = shardings.replicated, shardings.batch()
    return jax.jit(step, in_shardings=(rep, rep, shardings.params, rows, rows, rows),
                   out_shardings=(rep, rep, rep), donate_argnums=(0, 1))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Checkpoints:
    """OUT/checkpoints/<step>: adapters + optimizer state (Orbax) and a JSON record of the step,
    the micro-batches consumed, the data file's hash and the trajectory settings."""

    def __init__(self, directory: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, record: dict) -> None:
        args = ocp.args
        self.manager.save(step, args=args.Composite(state=args.StandardSave(state), record=args.JsonSave(record)))
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        args = ocp.args
        out = self.manager.restore(
            step, args=args.Composite(state=args.StandardRestore(abstract_state), record=args.JsonRestore())
        )
        return out.state, out.record

    def close(self) -> None:
        self.manager.close()


def _trajectory(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) if k != "buckets" else list(args.bucket_list) for k in TRAJECTORY_ARGS}


def _read_metrics(path: Path, up_to: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to]


def train(args: argparse.Namespace, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[dict]:
    """Run (or resume) the fine-tuning `args` describe; returns the metrics of all steps so far."""
    mesh = make_mesh(args.mesh or f"dp={jax.device_count()}")
    dp = mesh.shape["dp"]
    if args.batch_size % dp:
        raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of the mesh's dp size ({dp})")
    # The data first (it needs only the tokenizer): bad data fails before the weights load.
    ckpt = resolve_checkpoint(args.ckpt, progress=not args.no_progress)
    chat_format = chat_format_for(load_tokenizer(ckpt))
    examples = read_dataset(args.data, chat_format, args.max_seq_len, strict=args.strict, report=log)
    n_targets = sum(int(e.mask.sum()) for e in examples)
    log(f"{args.data}: {len(examples)} dialogs, {sum(len(e.tokens) for e in examples)} tokens, {n_targets} to learn")
    # A small inference cache only: the engine is not used, the parameters are.
    llm = llama_jax.load(ckpt, dtype=args.dtype, max_slots=dp, max_seq_len=16, mesh=mesh,
                         progress=not args.no_progress, quantize=args.quantize, scan_layers=True)
    config = llm.config
    shardings = ModelShardings(config, mesh)
    # Quantized weights are (value, scale) pytrees: shard them as the loader did.
    shardings.params = quantization.param_shardings(shardings.params, llm.params)
    batches = Batches(examples, args.batch_size, args.bucket_list, args.seed)
    optimizer = make_optimizer(args)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(out / CHECKPOINTS_DIR, args.keep)
    rep = shardings.replicated
    adapters = jax.device_put(lora.init(config, args.lora, jax.random.key(args.seed)), rep)
    opt_state = jax.jit(optimizer.init, out_shardings=rep)(adapters)
    trajectory = _trajectory(args)
    data_hash = _file_sha256(args.data)
    step = 0
    latest = ckpts.latest()
    if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                {"adapters": adapters, "opt_state": opt_state})
        state, record = ckpts.restore(latest, abstract)
        changed = [k for k in trajectory if record["trajectory"].get(k) != trajectory[k]]
        if changed:
            raise ValueError(f"{out / CHECKPOINTS_DIR}: the checkpoints were made with other settings "
                             f"({', '.join(changed)}); use another --out or delete it")
        if record["data_sha256"] != data_hash:
            raise ValueError(f"{args.data} changed since the checkpoints in {out / CHECKPOINTS_DIR} were made")
        adapters, opt_state, step = state["adapters"], state["opt_state"], record["step"]
        log(f"resuming from step {step} ({out / CHECKPOINTS_DIR / str(step)})")
    metrics = _read_metrics(out / METRICS_FILE, step)
    (out / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in metrics))

    train_step = make_train_step(config, args.lora, optimizer, shardings)
    rows = shardings.batch()
    params = llm.params
    stop = args.stop_after or args.steps
    lr_at = lr_schedule(args)
    bar = tqdm(total=args.steps, initial=step, desc="fine-tuning", unit="step", disable=args.no_progress,
               dynamic_ncols=True)
    try:
        while step < stop:
            start = time.perf_counter()
            losses, n_tokens = [], 0
            for k in range(args.grad_accum):
                b = batches[step * args.grad_accum + k]
                put = [jax.device_put(x, rows) for x in (b.tokens, b.targets, b.weights)]
                adapters, opt_state, loss = train_step(adapters, opt_state, params, *put)
                losses.append(loss)
                n_tokens += b.n_tokens
            loss = float(np.mean(jax.device_get(losses)))
            elapsed = time.perf_counter() - start
            step += 1
            row = {"step": step, "loss": loss, "lr": float(lr_at(step - 1)), "tokens": n_tokens,
                   "seconds": round(elapsed, 4)}
            metrics.append(row)
            with open(out / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{n_tokens / elapsed:.0f}")
            if step % args.save_every == 0 or step == stop:
                ckpts.save(step, {"adapters": adapters, "opt_state": opt_state},
                           {"step": step, "micro_batches": step * args.grad_accum, "data_sha256": data_hash,
                            "trajectory": trajectory})
    finally:
        bar.close()
        ckpts.close()
    lora.save(out, jax.device_get(adapters), args.lora, config)
    log(f"adapters after step {step} written to {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError) as e:  # bad data, paths, mesh, settings: say which, no traceback
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
