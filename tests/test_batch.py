"""Offline batch files (OpenAI's format, vLLM's run-batch): answers in the input's order, equal to
the same requests made alone; refused requests and malformed lines reported per line; and
scripts/run_batch.py on the demo model."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_server import random_params, tiny_config

from llama_jax.api import LLM
from llama_jax.server import create_app
from llama_jax.server.batch import run_batch
from llama_jax.tokenizer import llama3_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def request(custom_id: str, url: str, **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "tiny", **body}})


def test_batch_answers_in_order_as_alone() -> None:
    config = tiny_config()
    llm = LLM(config, random_params(config), llama3_tokenizer(), max_slots=4, max_seq_len=128)
    questions = [f"Question {i}: what is {i} + {i}?" for i in range(3)]
    lines = [request(f"q{i}", "/v1/chat/completions", messages=[{"role": "user", "content": q}], max_tokens=6,
                     temperature=0) for i, q in enumerate(questions)]
    lines += [
        request("text", "/v1/completions", prompt="The capital of France is", max_tokens=4, temperature=0),
        "",  # blank lines are skipped
        request("other-model", "/v1/chat/completions", messages=[{"role": "user", "content": "x"}]).replace(
            '"model": "tiny"', '"model": "gpt-4o"'),
        "{not json",
        request("q0", "/v1/completions", prompt="again"),
        request("streamed", "/v1/completions", prompt="x", stream=True),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/models", "body": {}}),
    ]
    seen: list[tuple[int, int]] = []
    app = create_app(llm, model_name="tiny", max_queue=len(lines))
    out = asyncio.run(run_batch(app, lines, concurrency=3, progress=lambda d, t: seen.append((d, t))))
    assert [o["custom_id"] for o in out] == [*(f"q{i}" for i in range(3)), "text", "other-model", None, "q0",
                                             "streamed", "get"]
    assert seen[-1] == (9, 9) and len({o["id"] for o in out}) == 9
    for i, q in enumerate(questions):
        response = out[i]["response"]
        assert response["status_code"] == 200 and out[i]["error"] is None
        alone = llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=6)
        assert response["body"]["choices"][0]["message"]["content"] == alone.content
    text = out[3]["response"]["body"]["choices"][0]["text"]
    assert text == llm.generate("The capital of France is", temperature=0, max_tokens=4).text
    assert out[4]["response"]["status_code"] == 404 and "gpt-4o" in out[4]["response"]["body"]["error"]["message"]
    for entry, message in zip(out[5:], ["line 7: not JSON", "custom_id 'q0' is used twice",
                                        "stream is not supported", "method must be POST"]):
        assert entry["response"] is None and message in entry["error"]["message"]
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(run_batch(app, lines, concurrency=0))


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("run_batch", ROOT / "scripts" / "run_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_batch_script(smol_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([
        json.dumps({"custom_id": "paris", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "demo", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}}),
        json.dumps({"custom_id": "count", "method": "POST", "url": "/v1/completions", "body": {
            "model": "demo", "prompt": "One, two, three,", "max_tokens": 4, "temperature": 0}}),
    ]))
    results = tmp_path / "results.jsonl"
    script = _load_script()
    # test_api's shapes: programs the compilation cache holds.
    assert script.main(["-i", str(requests), "-o", str(results), "--ckpt", str(smol_checkpoint), "--model-name",
                        "demo", "--max-slots", "4", "--max-seq-len", "512"]) == 0
    assert "2 of 2 requests answered 200" in capsys.readouterr().err
    paris, count = [json.loads(line) for line in results.read_text().splitlines()]
    assert "Paris" in paris["response"]["body"]["choices"][0]["message"]["content"]
    assert count["custom_id"] == "count" and count["response"]["body"]["usage"]["completion_tokens"] == 4
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_batch.py"), "-i", str(tmp_path / "no"),
                              "-o", str(results)], capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "no such file" in missing.stderr
