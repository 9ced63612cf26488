"""A client for a tagllm server: predictions, generation and training jobs.

    from tagllm import Client
    client = Client("http://127.0.0.1:8080", api_key="...")
    client.predict(function="QED", inputs=["CCO"])      # [0.41...]

Every error the server answers is raised as an `APIError` subclass carrying its
`error_type` and HTTP `status`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

__all__ = [
    "Client",
    "Job",
    "Label",
    "APIError",
    "ValidationError",
    "AuthError",
    "NotFoundError",
    "ConflictError",
    "OverloadedError",
    "UnavailableError",
    "ServerError",
    "JobFailed",
]

Input = Union[str, Mapping[str, str]]
Prediction = Union[float, "Label", str]


class APIError(Exception):
    """An error answer: `status`, the server's `error_type` and its message."""

    def __init__(self, status: int, error_type: str, message: str, body: Any = None):
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.error_type = error_type
        self.message = message
        self.body = body


class ValidationError(APIError):
    """400/422: the request names something wrong (the message says what)."""


class AuthError(APIError):
    """401/403: no key, a wrong key, or a route that needs the admin key."""


class NotFoundError(APIError):
    """404."""


class ConflictError(APIError):
    """409: e.g. cancelling a job that has ended."""


class OverloadedError(APIError):
    """429: over capacity; `retry_after` (seconds) says when to come back."""

    retry_after: Optional[float] = None


class UnavailableError(APIError):
    """503: loading, shutting down, queued past its deadline, or training not enabled."""


class ServerError(APIError):
    """500: the server's log has the details under the id in the message."""


class JobFailed(Exception):
    """A training job ended failed or cancelled; `job` is its last state."""

    def __init__(self, job: Dict[str, Any]):
        super().__init__(f"job {job.get('id')} {job.get('state')}: {job.get('error')}")
        self.job = job


_BY_STATUS = {
    400: ValidationError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
    429: OverloadedError,
    503: UnavailableError,
}


# The status each `error_type` is answered with (a stream's `error` event has no status).
_STATUS_OF_KIND = {
    "validation": 422,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "overloaded": 429,
    "queue_timeout": 503,
    "not_ready": 503,
    "engine_down": 503,
    "shutting_down": 503,
}


def _error(status: int, body: Any, headers: Mapping[str, str]) -> APIError:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        kind, message = str(body.get("error_type", "unknown")), body["error"]
    elif isinstance(body, dict) and isinstance(body.get("error"), dict):  # the /v1 shape
        e = body["error"]
        kind, message = str(e.get("code") or e.get("type")), str(e.get("message"))
    else:
        kind, message = "unknown", str(body)
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    err = cls(status, kind, message, body)
    if isinstance(err, OverloadedError) and headers.get("retry-after"):
        try:
            err.retry_after = float(headers["retry-after"])
        except ValueError:
            pass
    return err


@dataclass
class Label:
    """A classification: the most likely label and every label's probability."""

    label: str
    scores: Dict[str, float] = field(default_factory=dict)


def _prediction(p: Dict[str, Any]) -> Prediction:
    if "value" in p:
        return float(p["value"])
    if "label" in p:
        return Label(p["label"], dict(p.get("scores", {})))
    return str(p["text"])


def _sse(lines: Iterable[str]) -> Iterator[Tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream."""
    event, data = "message", []  # type: str, List[str]
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, "\n".join(data)


class Client:
    """A tagllm server at `url`; `api_key` is sent as `Authorization: Bearer` (the admin
    key where the server has one, for training)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        api_key: Optional[str] = None,
        timeout: float = 300.0,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._http.request(method, path, **kw)
        return self._read(resp)

    @staticmethod
    def _read(resp: httpx.Response) -> Any:
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            raise _error(resp.status_code, body, resp.headers)
        return body

    def _events(self, method: str, path: str, **kw: Any) -> Iterator[Tuple[str, Any]]:
        with self._http.stream(method, path, timeout=None, **kw) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._read(resp)
            for event, data in _sse(resp.iter_lines()):
                yield event, json.loads(data)

    # --- the service ------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        return self._request("GET", "/health")

    def info(self) -> Dict[str, Any]:
        """The model, the limits and the version."""
        return self._request("GET", "/info")

    def tags(self) -> List[Dict[str, Any]]:
        """Every served tag (name, kind, version, head, template)."""
        return self._request("GET", "/tags")["tags"]

    def tag(self, name: str) -> Dict[str, Any]:
        """One tag's manifest and source."""
        return self._request("GET", f"/tags/{name}")

    # --- predictions ------------------------------------------------------------------

    def predict_raw(
        self,
        inputs: Sequence[Input],
        function: Optional[str] = None,
        functions: Optional[Sequence[str]] = None,
        template: Optional[str] = None,
        parameters: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, Any]:
        """`POST /predict` as it answers: predictions, tag versions, usage."""
        body: Dict[str, Any] = {"inputs": list(inputs)}
        if function is not None:
            body["function"] = function
        if functions is not None:
            body["functions"] = list(functions)
        if template is not None:
            body["template"] = template
        if parameters:
            body["parameters"] = dict(parameters)
        return self._request("POST", "/predict", json=body)

    def predict(
        self,
        function: Optional[str] = None,
        inputs: Sequence[Input] = (),
        *,
        functions: Optional[Sequence[str]] = None,
        template: Optional[str] = None,
        parameters: Optional[Mapping[str, Any]] = None,
    ) -> List[Any]:
        """One prediction per input: a float (regression), a `Label` (classification) or
        the generated text; with `functions`, a dict of them by function name."""
        if isinstance(inputs, (str, dict)):
            raise TypeError("inputs is a list of inputs")
        resp = self.predict_raw(inputs, function, functions, template, parameters)
        out: List[Any] = []
        for p in resp["predictions"]:
            if functions is not None:
                out.append({name: _prediction(v) for name, v in p.items()})
            else:
                out.append(_prediction(p))
        return out

    def predict_frame(
        self,
        function: Optional[str] = None,
        inputs: Sequence[Input] = (),
        *,
        functions: Optional[Sequence[str]] = None,
        template: Optional[str] = None,
        parameters: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        """`predict` as a pandas DataFrame: a column `input` (or one per slot) and one
        column per function (a label's scores as `<function>.<label>` columns)."""
        import pandas as pd  # optional: `pip install tagllm[pandas]`

        preds = self.predict(
            function, inputs, functions=functions, template=template, parameters=parameters
        )
        rows = []
        for inp, p in zip(inputs, preds):
            row: Dict[str, Any] = dict(inp) if isinstance(inp, Mapping) else {"input": inp}
            per_fn = p if functions is not None else {function or "prediction": p}
            for name, v in per_fn.items():
                if isinstance(v, Label):
                    row[name] = v.label
                    row.update({f"{name}.{k}": s for k, s in v.scores.items()})
                else:
                    row[name] = v
            rows.append(row)
        return pd.DataFrame(rows)

    def generate(
        self,
        text: Union[str, Mapping[str, str]],
        *,
        function: Optional[str] = None,
        template: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Optional[Sequence[str]] = None,
        stream: bool = False,
    ) -> Any:
        """The text a generation tag (or a template) produces for one input; with
        `stream=True`, an iterator of text pieces as they are decoded."""
        params = {
            k: v
            for k, v in {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "stop": list(stop) if stop else None,
            }.items()
            if v is not None
        }
        if not stream:
            return self.predict(function, [text], template=template, parameters=params)[0]
        body: Dict[str, Any] = {"inputs": [text], "stream": True, "parameters": params}
        if function is not None:
            body["function"] = function
        if template is not None:
            body["template"] = template
        return self._stream_text(body)

    def _stream_text(self, body: Dict[str, Any]) -> Iterator[str]:
        for event, data in self._events("POST", "/predict", json=body):
            if event == "token":
                yield data["text"]
            elif event == "error":
                raise _error(_STATUS_OF_KIND.get(data.get("error_type"), 500), data, {})
            elif event == "done":
                return

    # --- training ---------------------------------------------------------------------

    def upload_dataset(
        self, records: Union[Iterable[Mapping[str, Any]], str, Path], name: Optional[str] = None
    ) -> Dict[str, Any]:
        """Stores a JSONL dataset (records, or a `.jsonl` file's path); answers its `id`,
        record count and sha256."""
        if isinstance(records, (str, Path)):
            data = Path(records).read_bytes()
        else:
            data = "".join(json.dumps(r) + "\n" for r in records).encode()
        params = {"name": name} if name else None
        return self._request(
            "POST",
            "/datasets",
            content=data,
            params=params,
            headers={"content-type": "application/x-ndjson"},
        )

    @staticmethod
    def _dataset(d: Any) -> Dict[str, Any]:
        if isinstance(d, str):
            return {"id": d}
        if isinstance(d, Mapping):
            return dict(d)
        return {"records": list(d)}

    def train(
        self,
        stage: int,
        tag: Optional[str] = None,
        dataset: Any = None,
        *,
        eval_dataset: Any = None,
        hyperparameters: Optional[Mapping[str, Any]] = None,
        **fields: Any,
    ) -> "Job":
        """Queues a training job (`POST /train`); `dataset` is an uploaded dataset's id, a
        list of records, or `{"path": ...}`. Other `POST /train` fields (`template`,
        `target`, `head`, `tags`) pass as keywords."""
        body: Dict[str, Any] = {"stage": stage, "dataset": self._dataset(dataset), **fields}
        if tag is not None:
            body["tag"] = tag
        if eval_dataset is not None:
            body["eval_dataset"] = self._dataset(eval_dataset)
        if hyperparameters:
            body["hyperparameters"] = dict(hyperparameters)
        accepted = self._request("POST", "/train", json=body)
        return Job(self, accepted["id"])

    def job(self, id: str) -> "Job":
        return Job(self, id)

    def jobs(self, state: Optional[str] = None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        params = {k: v for k, v in {"state": state, "limit": limit}.items() if v is not None}
        return self._request("GET", "/jobs", params=params)["jobs"]


_TERMINAL = {"succeeded", "failed", "cancelled"}


class Job:
    """A training job on the server; `info` is its state as last seen."""

    def __init__(self, client: Client, id: str):
        self.client = client
        self.id = id
        self.info: Dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Job({self.id!r}, state={self.info.get('state')!r})"

    def refresh(self) -> Dict[str, Any]:
        self.info = self.client._request("GET", f"/jobs/{self.id}")
        return self.info

    @property
    def state(self) -> str:
        return str(self.refresh()["state"])

    def curve(self) -> List[Dict[str, Any]]:
        """The training curve: `{step, loss, eval_loss, at}` points by step."""
        return self.client._request("GET", f"/jobs/{self.id}/curve")["points"]

    def cancel(self) -> Dict[str, Any]:
        self.info = self.client._request("DELETE", f"/jobs/{self.id}")
        return self.info

    def wait(self, progress: bool = True, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Follows the job's event stream (a tqdm bar of its steps and loss) until it ends;
        answers the tag it published (`GET /tags/{tag}`: manifest and source). Raises
        `JobFailed` if it failed or was cancelled, `TimeoutError` past `timeout` seconds."""
        from tqdm.auto import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=None, unit="step", desc=f"job {self.id[:8]}", disable=not progress)
        try:
            while self.info.get("state") not in _TERMINAL:
                self._follow(bar, deadline)
                if self.info.get("state") not in _TERMINAL:
                    # The stream ended early (a restart, a proxy): look, then follow again.
                    self.refresh()
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {self.id} still {self.info.get('state')}")
                    time.sleep(0.5)
        finally:
            bar.close()
        if self.info["state"] != "succeeded":
            raise JobFailed(self.info)
        return self.client.tag(self.info["tag"])

    def _follow(self, bar: Any, deadline: Optional[float]) -> None:
        try:
            for event, job in self.client._events("GET", f"/jobs/{self.id}/events"):
                if event != "progress":
                    continue
                self.info = job
                if job.get("total_steps"):
                    bar.total = job["total_steps"]
                bar.n = job.get("step", 0)
                if job.get("loss") is not None:
                    bar.set_postfix(loss=f"{job['loss']:.4f}", state=job["state"], refresh=False)
                bar.refresh()
                if job["state"] in _TERMINAL:
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {job['state']}")
        except httpx.TransportError:
            return
