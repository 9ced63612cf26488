"""The server under test: `scripts/python-clients-test.sh` starts a real `tagllm serve` on
the default model and the shipped tags, and names it here."""

import json
import os
import re

import httpx
import jsonschema
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


class Documented:
    """Checks answers against the server's own OpenAPI document: every JSON body the
    tests receive must be the one the document gives for its route, status and type."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.checked = 0

    def operation(self, path: str, method: str) -> dict:
        for template, item in self.spec["paths"].items():
            pattern = "^" + re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(pattern, path) and method in item:
                return item[method]
        raise AssertionError(f"{method} {path} is not in the document")

    def check(self, response: httpx.Response) -> None:
        ctype = response.headers.get("content-type", "").split(";")[0]
        if ctype != "application/json":
            return  # streams are checked chunk by chunk in tests/http_openai.rs
        op = self.operation(response.request.url.path, response.request.method.lower())
        documented = op["responses"].get(str(response.status_code))
        assert documented, f"{response.request.url.path}: status {response.status_code} undocumented"
        schema = dict(documented["content"][ctype]["schema"])
        schema["components"] = self.spec["components"]
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        response.read()
        jsonschema.validate(json.loads(response.content), schema)
        self.checked += 1


@pytest.fixture(scope="session")
def documented() -> Documented:
    return Documented(httpx.get(f"{URL}/openapi.json").json())
