"""The official `openai` package against a real tagllm server."""

import httpx
import openai
import pytest
from conftest import READER_KEY, URL, predicted_text


@pytest.fixture(scope="module")
def client(documented) -> openai.OpenAI:
    """The package as users make it, its every JSON answer checked against the document."""
    http = httpx.Client(event_hooks={"response": [documented.check]})
    return openai.OpenAI(base_url=f"{URL}/v1", api_key=READER_KEY, max_retries=0, http_client=http)


def test_models_list_the_base_model_and_the_generation_tags(client, base_model):
    models = {m.id: m for m in client.models.list()}
    assert base_model in models
    assert "Translate" in models, models
    # Head tags answer numbers, not text: they are not models here.
    assert "QED" not in models
    assert models["Translate"].model_dump()["parent"] == base_model


def chat_both_ways(client, **kw):
    """The answer's text unstreamed, and the streamed pieces joined."""
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kw)
        if c.choices
    ]
    return whole.choices[0].message.content, "".join(pieces)


def test_a_translation_from_the_translate_tag_streamed_and_not(client, http):
    text, joined = chat_both_ways(
        client,
        model="Translate",
        messages=[{"role": "user", "content": "Save the changes"}],
        temperature=0,
        max_tokens=24,
    )
    assert text.strip()
    assert joined == text
    want = predicted_text(http, {"function": "Translate", "inputs": ["Save the changes"],
                                 "parameters": {"max_new_tokens": 24}})
    assert text == want


def test_the_languages_are_chosen_by_tags(client, http):
    text, joined = chat_both_ways(
        client,
        model="Translate",
        messages=[{"role": "user", "content": "Salva le modifiche"}],
        temperature=0,
        max_tokens=24,
        extra_body={"tags": {"source": "IT", "target": "FR"}},
    )
    assert joined == text
    template = http.get("/tags/Translate").json()["manifest"]["template"].replace("<EN>", "<IT>")
    want = predicted_text(http, {"template": template, "inputs": ["Salva le modifiche"],
                                 "parameters": {"max_new_tokens": 24}})
    assert text == want


def test_a_chat_answer_from_the_base_model_streamed_and_not(client, base_model):
    text, joined = chat_both_ways(
        client,
        model=base_model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "Paris" in text
    assert joined == text


def test_a_text_completion_streamed_and_not(client, base_model, http):
    kw = dict(model=base_model, prompt="The capital of France is", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw)
    joined = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert joined == whole.choices[0].text
    want = predicted_text(http, {"template": "{x}", "inputs": ["The capital of France is"],
                                 "parameters": {"max_new_tokens": 8}})
    assert whole.choices[0].text == want


def test_errors_are_the_packages_own_exceptions(client, base_model):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="NoSuchTag", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=base_model, messages=[{"role": "user", "content": "x"}], logprobs=True)
    assert e.value.param == "logprobs"
    wrong = openai.OpenAI(base_url=f"{URL}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_every_json_answer_was_checked_against_the_document(documented):
    # Runs last in this module: the model list, four unstreamed answers, two errors.
    assert documented.checked >= 7, documented.checked
