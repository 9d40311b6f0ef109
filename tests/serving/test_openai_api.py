"""The OpenAI-compatible API on a real server with the real SmolLM2, through the official
`openai` client and raw httpx."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

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
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"999999": 1}}, 400, "vocabulary"),
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


def _reference(smollm, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-probabilities of one forward pass over `ids`, in this process."""
    with torch.inference_mode():
        return smollm.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server, smollm):
    """lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs 1, max_tokens 1):
    the prompt comes back with its tokens' log-probabilities, the model's own."""
    ids = smollm.tokenizer(EIFFEL + " Paris").input_ids
    r = server.openai().completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                           temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(EIFFEL + " Paris")
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[:len(ids)]) == EIFFEL + " Paris" and lp.text_offset[:2] == [0, len(lp.tokens[0])]
    ref = _reference(smollm, ids)
    for position, token in enumerate(ids[1:]):
        assert abs(lp.token_logprobs[position + 1] - ref[position, token].item()) < 2e-3
        assert len(lp.top_logprobs[position + 1]) == 1
    # the continuation " Paris" is greedy: each of its tokens is the top alternative
    assert max(lp.top_logprobs[-2], key=lp.top_logprobs[-2].get) == lp.tokens[-2] == " Paris"
    without = server.openai().completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=1, temperature=0)
    assert without.choices[0].logprobs is None and without.choices[0].text == r.choices[0].text


def test_max_tokens_0_with_echo_scores_the_prompt_alone(server):
    client = server.openai()
    kw = dict(model=MODEL, prompt=[EIFFEL, "The official language of Italy is"], echo=True, logprobs=0, max_tokens=0)
    r = client.completions.create(**kw)
    one = client.completions.create(**{**kw, "max_tokens": 1})
    assert [c.text for c in r.choices] == kw["prompt"] and r.usage.completion_tokens == 0
    for scored, longer in zip(r.choices, one.choices):
        assert scored.finish_reason == "length" and scored.logprobs.tokens == longer.logprobs.tokens[:-1]
        assert scored.logprobs.token_logprobs == longer.logprobs.token_logprobs[:-1]
    streamed = [c for c in client.completions.create(**kw, stream=True, stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == 0) == EIFFEL
    assert streamed[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens 0"):
        client.completions.create(model=MODEL, prompt=EIFFEL, max_tokens=0)


def test_completion_logprobs_streamed_and_not_agree(server, smollm):
    client = server.openai()
    kw = dict(model=MODEL, prompt=EIFFEL, max_tokens=6, temperature=0, logprobs=3)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert tokens == whole.logprobs.tokens and "".join(tokens) == whole.text
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-4)
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset == [len("".join(tokens[:i])) for i in range(len(tokens))]
    ids = smollm.tokenizer(EIFFEL).input_ids
    generated = smollm.tokenizer(whole.text, add_special_tokens=False).input_ids
    ref = _reference(smollm, ids + generated)
    for i, (token, value, top) in enumerate(zip(generated, whole.logprobs.token_logprobs, whole.logprobs.top_logprobs)):
        assert abs(value - ref[len(ids) - 1 + i, token].item()) < 2e-3
        assert len(top) == 3 and max(top.values()) == pytest.approx(value)  # greedy: the most likely


def test_text_offsets_count_a_character_split_over_tokens_once(server, smollm):
    """A byte-level token may hold part of a character (its text shows U+FFFD): each token's
    text_offset is where it starts in the choice's text, streamed or not."""
    prompt = "Tōkyō 東京 is the capital of"
    assert any("\ufffd" in smollm.tokenizer.decode([t]) for t in smollm.tokenizer(prompt).input_ids)
    client = server.openai()
    kw = dict(model=MODEL, prompt=prompt, echo=True, max_tokens=4, temperature=0, logprobs=0)
    whole = client.completions.create(**kw).choices[0]
    lp = whole.logprobs
    streamed = [o for c in client.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp.text_offset and lp.text_offset == sorted(lp.text_offset)
    for token, offset in zip(lp.tokens, lp.text_offset):
        if "\ufffd" in token:  # what comes before the part of a character, then that character
            head = token.split("\ufffd")[0]
            assert whole.text[offset:offset + len(head)] == head and ord(whole.text[offset + len(head)]) > 127
        else:
            assert whole.text[offset:offset + len(token)] == token
    assert whole.text.startswith(prompt) and lp.text_offset[-1] < len(whole.text)


def test_chat_logprobs(server):
    client = server.openai()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say café in Japanese"}],
                                       max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    # each token's bytes are exact, even where a token holds part of a character
    assert bytes(b for t in content for b in t.bytes).decode("utf-8") == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say café in Japanese"}], max_tokens=12, temperature=0,
        logprobs=True, stream=True) if c.choices and c.choices[0].logprobs]
    assert [t.token for s in streamed for t in s.content] == [t.token for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)


def test_penalties_and_logit_bias_through_the_official_client(server, smollm):
    client = server.openai()
    rome = smollm.tokenizer(" Rome", add_special_tokens=False).input_ids[0]
    r = client.completions.create(model=MODEL, prompt=EIFFEL, max_tokens=3, temperature=0,
                                  logit_bias={str(rome): 100})
    assert r.choices[0].text == " Rome" * 3
    kw = dict(model=MODEL, prompt="one one one one one one one one", max_tokens=8, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penalized = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    def most_repeated(text: str) -> int:
        ids = smollm.tokenizer(text, add_special_tokens=False).input_ids
        return max(ids.count(t) for t in ids)

    assert penalized != plain and most_repeated(penalized) < most_repeated(plain)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a city."}],
                                          max_tokens=2, temperature=0, logit_bias={str(rome): 100})
    assert chat.choices[0].message.content == " Rome Rome"
