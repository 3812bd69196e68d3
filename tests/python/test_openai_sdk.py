"""The official `openai` SDK against `oxtune deploy` on the demo model."""

import json
import threading

import openai
import pytest
from openai import OpenAI


def client_for(server, api_key=None, **kwargs):
    return OpenAI(base_url=f"http://localhost:{server['port']}/v1",
                  api_key=api_key or server["key"], max_retries=0, **kwargs)


def test_the_brief_snippet(server):
    # The brief's snippet verbatim, with the port, key and served name substituted.
    from openai import OpenAI
    client = OpenAI(base_url=f"http://localhost:{server['port']}/v1", api_key=server["key"])
    response = client.chat.completions.create(
        model=server["model"],
        messages=[{"role": "user", "content": "请生成一段PRD功能描述"}],
        max_tokens=16)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.usage.completion_tokens <= 16


def test_models_list(server):
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == [server["model"]]


def test_streaming_with_usage(server):
    stream = client_for(server).chat.completions.create(
        model=server["model"], messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0


def test_n_and_seed_determinism(server):
    client = client_for(server)
    ask = dict(model=server["model"], messages=[{"role": "user", "content": "Name a colour."}],
               max_tokens=8, temperature=1.0, seed=1234, n=2)
    first = client.chat.completions.create(**ask)
    second = client.chat.completions.create(**ask)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]


def test_logprobs(server):
    response = client_for(server).chat.completions.create(
        model=server["model"], messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) >= 1
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in content)
    completion = client_for(server).completions.create(
        model=server["model"], prompt="The capital of France is", max_tokens=3, temperature=0,
        logprobs=2)
    assert len(completion.choices[0].logprobs.tokens) >= 1


def test_stop(server):
    client = client_for(server)
    ask = dict(model=server["model"], prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    plain = client.completions.create(**ask).choices[0].text
    stop = plain.strip()[:1]
    if not stop:
        pytest.skip("the model produced only whitespace")
    stopped = client.completions.create(**ask, stop=[stop]).choices[0]
    assert stop not in stopped.text
    assert stopped.finish_reason == "stop"


def test_json_schema_output_parses(server):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    response = client_for(server).chat.completions.create(
        model=server["model"],
        messages=[{"role": "user", "content": "Give a person's name and age as JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(response.choices[0].message.content)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_errors_are_typed(server):
    client = client_for(server)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=server["model"], messages=messages, temperature=-1)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=messages)
    assert error.value.body["param"] == "model"
    with pytest.raises(openai.AuthenticationError):
        client_for(server, api_key="wrong-key").models.list()


def test_overload_is_a_rate_limit_error(server):
    """With --max_concurrent_requests 4, a fifth concurrent request gets 429."""
    client = client_for(server)
    admitted = threading.Barrier(5)
    gate = threading.Barrier(5)
    streams = []

    def hold():
        stream = client.chat.completions.create(
            model=server["model"], messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        streams.append(stream)
        next(iter(stream))  # the request is admitted and running
        admitted.wait(timeout=120)
        gate.wait(timeout=120)
        stream.close()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        admitted.wait(timeout=120)
        gate_error = None
        try:
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=server["model"],
                                               messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=1)
        except BaseException as error:  # noqa: BLE001 - release the holders first
            gate_error = error
        gate.wait(timeout=120)
        if gate_error:
            raise gate_error
    finally:
        for thread in threads:
            thread.join(timeout=120)
