"""The OpenAI-compatible API on a real server with the real SmolLM2, through the official
`openai` client and raw httpx."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.servers import run_server

MODEL = "smollm2-135m"
EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("openai") / "store") as s:
        yield s


def test_completion_with_the_official_client(server):
    r = server.openai().completions.create(model=MODEL, prompt=EIFFEL, max_tokens=5, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 10 and 1 <= r.usage.completion_tokens <= 5
    assert r.system_fingerprint == "base"


def test_chat_with_the_official_client(server):
    r = server.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"


def test_streaming_completion_and_chat(server):
    client = server.openai()
    chunks = list(client.completions.create(model=MODEL, prompt=EIFFEL, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "Paris" in "".join(pieces) and len(pieces) > 2


def test_stream_is_identical_to_the_non_streamed_text(server):
    client = server.openai()
    whole = client.completions.create(model=MODEL, prompt="The official language of Italy is", max_tokens=12,
                                      temperature=0).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The official language of Italy is", max_tokens=12, temperature=0, stream=True))
    assert streamed == whole


def test_stop_sequences_and_max_tokens(server):
    client = server.openai()
    r = client.completions.create(model=MODEL, prompt=EIFFEL, max_tokens=10, temperature=0, stop=[", France"])
    assert r.choices[0].text == " Paris" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_sampling_with_a_seed_is_reproducible_and_n_gives_choices(server):
    client = server.openai()
    kw = dict(model=MODEL, prompt="My favourite food is", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    r = client.completions.create(model=MODEL, prompt=["Hello,", "The sky is"], n=2, max_tokens=4, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_models_and_health(server):
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["version"] == "base"


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "bogus_param": 1}, 400, "bogus_param"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": [10**9]}, 400, "token ids"),
    ({"model": MODEL, "prompt": "word " * 5000, "max_tokens": 10}, 400, "maximum context length"),
])
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] and "\n" not in err["message"]
    assert r.headers["x-edit-serve-patchset"] == "base"


def test_oversized_body_is_refused(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{" + b" " * (5 * 1024 * 1024) + b"}",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_official_client_raises_on_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.openai().completions.create(model="nope", prompt="x")


def test_raw_sse_framing(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": EIFFEL, "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-edit-serve-patchset"] == "base"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    json.loads(lines[0][6:])
