"""The official `openai` Python SDK against a running Mangoo (run by tests/api/openai_sdk.rs).

Environment: BASE_URL (Mangoo's .../v1), TOKEN (a JWT, given as the API key), CONTROL_URL (the
test upstream's control API: scripts the next answers, releases gated tokens), MODEL (a bot id).
Each check raises on failure; the script exits non-zero on the first one.
"""

import json
import os
import urllib.request

import openai
from openai import OpenAI, Stream
from openai.types.chat import ChatCompletionChunk

BASE_URL = os.environ["BASE_URL"]
CONTROL_URL = os.environ["CONTROL_URL"]
MODEL = os.environ["MODEL"]
client = OpenAI(base_url=BASE_URL, api_key=os.environ["TOKEN"], max_retries=0)


def control(path, body):
    request = urllib.request.Request(
        CONTROL_URL + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request).close()


def streamed_with_usage():
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!", text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"], finish
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 16, chunks[-1]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def unstreamed_and_continued():
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}]
    )
    chat_id = raw.headers["x-mangoo-chat-id"]
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello, world!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 12 and completion.usage.completion_tokens == 4
    control("/control/script", {"tokens": ["Still", " here"]})
    again = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Are you there?"}],
        max_tokens=50,
        temperature=0.1,
        extra_headers={"X-Mangoo-Chat-Id": chat_id},
    )
    assert again.choices[0].message.content == "Still here", again


def errors_raise_the_sdks_exceptions():
    try:
        client.chat.completions.create(model="no-such-bot", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.code == "model_not_found" and e.param == "model", e
    try:
        OpenAI(base_url=BASE_URL, api_key="not-a-token", max_retries=0).models.list()
        raise AssertionError("a bad key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.type == "invalid_request_error", e
    try:
        client.chat.completions.create(model=MODEL, messages=[])
        raise AssertionError("no messages was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
    control("/control/script", {"tokens": [], "http_error": 429})
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("a throttled answer succeeded")
    except openai.RateLimitError as e:
        assert e.code == "upstream_throttled", e
    control("/control/script", {"tokens": [], "http_error": 429})
    try:
        for _ in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
        raise AssertionError("a throttled stream ended well")
    except openai.APIError as e:
        assert e.code == "upstream_throttled", e


def models_are_the_bots():
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids, ids
    assert client.models.retrieve(MODEL).id == MODEL


def a_dropped_stream_resumes_without_a_duplicate():
    control("/control/script", {"tokens": ["The", " sea", " is", " wide", "."], "gated": True})
    seen_text, last_id = "", None
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": "sea?"}], stream=True
    ) as response:
        chat_id = response.headers["x-mangoo-chat-id"]
        control("/control/release", {"n": 2})
        contents = 0
        for line in response.iter_lines():
            if line.startswith("id:"):
                last_id = line[3:].strip()
            elif line.startswith("data:"):
                delta = json.loads(line[5:])["choices"][0]["delta"]
                if delta.get("content"):
                    seen_text += delta["content"]
                    contents += 1
                    if contents == 2:
                        break
    # The connection is gone; the answer goes on. The SDK's own stream parser reads the rest.
    control("/control/release", {"n": 3})
    rest = client.get(
        f"/chats/{chat_id}/completions/stream",
        cast_to=ChatCompletionChunk,
        stream=True,
        stream_cls=Stream[ChatCompletionChunk],
        options={"headers": {"Last-Event-ID": last_id}},
    )
    rest_text = "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    assert seen_text == "The sea", seen_text
    assert seen_text + rest_text == "The sea is wide.", seen_text + rest_text


for check in [
    streamed_with_usage,
    unstreamed_and_continued,
    errors_raise_the_sdks_exceptions,
    models_are_the_bots,
    a_dropped_stream_resumes_without_a_duplicate,
]:
    check()
    print("ok", check.__name__, flush=True)
