"""The server under test: `scripts/python-clients-test.sh` starts a real `tagllm serve` on
the default model and the shipped tags, and names it here."""

import os

import httpx
import pytest

URL = os.environ["TAGLLM_URL"]
READER_KEY = os.environ["TAGLLM_API_KEY"]
ADMIN_KEY = os.environ["TAGLLM_ADMIN_KEY"]


@pytest.fixture(scope="session")
def http() -> httpx.Client:
    with httpx.Client(base_url=URL, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def base_model(http: httpx.Client) -> str:
    """The base model's id on the /v1 routes (the first entry of /v1/models)."""
    return http.get("/v1/models").json()["data"][0]["id"]


def predicted_text(http: httpx.Client, body: dict) -> str:
    resp = http.post("/predict", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["predictions"][0]["text"]
