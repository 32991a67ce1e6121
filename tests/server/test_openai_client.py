"""The official `openai` package, sync and async, streaming and not, against the real server."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.server.live import LONG_PROMPT

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0) as c:
        yield c


def test_models_list_has_models_and_trained_adapters(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", "tiny:qa"]  # the untrained adapter has no weights: not servable
    card = client.models.retrieve("tiny:qa")
    assert card.id == "tiny:qa" and card.object == "model" and card.owned_by == "hyprstream"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny:nope")


def test_completion_matches_the_engine(client, engine):
    from hyprstream_tui.engine.params import SamplingParams

    reply = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=20, temperature=0)
    alone = engine.generate("tiny", LONG_PROMPT, SamplingParams(temperature=0, max_tokens=20)).result()
    choice = reply.choices[0]
    assert choice.text == alone.text and choice.finish_reason == "length"
    assert reply.object == "text_completion" and reply.model == "tiny"
    assert reply.usage.prompt_tokens == alone.prompt_tokens
    assert reply.usage.completion_tokens == 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 20


def test_chat_with_adapter_differs_from_base(client):
    base = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    tuned = client.chat.completions.create(model="tiny:qa", messages=CHAT, max_tokens=12, temperature=0)
    again = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    assert base.choices[0].message.role == "assistant"
    assert base.choices[0].message.content != tuned.choices[0].message.content
    assert again.choices[0].message.content == base.choices[0].message.content
    assert tuned.model == "tiny:qa" and tuned.object == "chat.completion"


def test_chat_without_max_tokens_may_use_the_rest_of_the_window(client):
    reply = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0)
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 512
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=30,
                                      temperature=0.8, seed=7)
    chunks = list(client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=30,
                                            temperature=0.8, seed=7, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].choices == []


def test_streamed_chat_chunks(client):
    stream = client.chat.completions.create(model="tiny:qa", messages=CHAT, max_tokens=16,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model="tiny:qa", messages=CHAT, max_tokens=16, temperature=0)
    assert text == whole.choices[0].message.content


def test_seed_reproduces_and_stop_strings_cut(client):
    kwargs = dict(model="tiny", prompt=LONG_PROMPT, max_tokens=40, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=3, **kwargs).choices[0].text
    b = client.completions.create(seed=3, **kwargs).choices[0].text
    assert a == b
    stop = a[10:13]
    assert stop and stop not in a[:10]
    cut = client.completions.create(seed=3, stop=[stop], **kwargs).choices[0]
    assert cut.finish_reason == "stop" and cut.text == a[: a.index(stop)]


def test_async_client_concurrent_requests_stream_and_not(live, client):
    async def main():
        async with openai.AsyncOpenAI(base_url=live.v1, api_key="unused", max_retries=0) as aclient:
            async def streamed(model):
                stream = await aclient.chat.completions.create(
                    model=model, messages=CHAT, max_tokens=10, temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            async def whole(model):
                reply = await aclient.chat.completions.create(
                    model=model, messages=CHAT, max_tokens=10, temperature=0)
                return reply.choices[0].message.content

            return await asyncio.gather(streamed("tiny"), whole("tiny"), streamed("tiny:qa"),
                                        whole("tiny:qa"), aclient.models.list())

    s_base, w_base, s_qa, w_qa, models = asyncio.run(main())
    assert s_base == w_base and s_qa == w_qa and s_base != s_qa
    assert [m.id for m in models.data] == ["tiny", "tiny:qa"]
    sync = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert sync.choices[0].message.content == w_base


def test_async_completions(live):
    async def main():
        async with openai.AsyncOpenAI(base_url=live.v1, api_key="unused", max_retries=0) as aclient:
            reply = await aclient.completions.create(model="tiny", prompt="Hello", max_tokens=5,
                                                     temperature=0)
            stream = await aclient.completions.create(model="tiny", prompt="Hello", max_tokens=5,
                                                      temperature=0, stream=True)
            return reply, "".join([c.choices[0].text async for c in stream])

    reply, streamed = asyncio.run(main())
    assert reply.choices[0].text == streamed


def test_errors_come_back_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hi", max_tokens=100_000)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=CHAT, n=2)
    assert info.value.body["param"] == "n"
