"""The project's Python client against a real tagllm server."""

import pytest
from conftest import ADMIN_KEY, READER_KEY, URL

import tagllm

MOLECULES = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O"]


@pytest.fixture(scope="module")
def client() -> tagllm.Client:
    with tagllm.Client(URL, api_key=ADMIN_KEY) as c:
        yield c


def test_predict_equals_the_predict_route(client, http):
    values = client.predict(function="QED", inputs=MOLECULES)
    resp = http.post("/predict", json={"function": "QED", "inputs": MOLECULES}).json()
    assert values == [p["value"] for p in resp["predictions"]]
    assert all(isinstance(v, float) for v in values)
    both = client.predict(functions=["QED", "Translate"], inputs=["CCO"])
    # Several functions share their common prefix's forward: equal up to float rounding.
    assert both[0]["QED"] == pytest.approx(values[0], rel=1e-4)
    assert isinstance(both[0]["Translate"], str)


def test_predict_frame_has_a_column_per_function(client):
    pytest.importorskip("pandas")
    frame = client.predict_frame(function="QED", inputs=MOLECULES)
    assert list(frame.columns) == ["input", "QED"]
    assert list(frame["QED"]) == client.predict(function="QED", inputs=MOLECULES)


def test_generate_streams_pieces_that_join_to_the_text(client):
    whole = client.generate("Save the changes", function="Translate", max_new_tokens=16)
    pieces = list(client.generate("Save the changes", function="Translate", max_new_tokens=16, stream=True))
    assert len(pieces) > 1
    assert "".join(pieces) == whole


def test_errors_carry_the_servers_error_type(client):
    with pytest.raises(tagllm.ValidationError) as e:
        client.predict(function="NoSuchTag", inputs=["x"])
    assert e.value.error_type == "validation" and e.value.status == 422
    assert "NoSuchTag" in e.value.message
    with pytest.raises(tagllm.AuthError) as e:
        tagllm.Client(URL).tags()
    assert e.value.error_type == "unauthorized"
    with pytest.raises(tagllm.AuthError) as e:
        tagllm.Client(URL, api_key=READER_KEY).train(stage=1, tag="X", dataset=[{"text": "a"}])
    assert e.value.error_type == "forbidden"
    with pytest.raises(tagllm.NotFoundError):
        client.job("no-such-job").refresh()


def test_a_training_job_runs_to_its_published_tag_with_progress(client, capsys):
    records = [{"text": t} for t in ["CCO and c1ccccc1", "CC(=O)O is acetic acid", "c1ccncc1 pyridine"] * 4]
    dataset = client.upload_dataset(records, name="py-client-test")
    assert dataset["records"] == len(records)
    job = client.train(stage=1, tag="PyLang", dataset=dataset["id"],
                       hyperparameters={"steps": 3, "batch_size": 2})
    tag = job.wait(progress=True, timeout=600)
    assert tag["manifest"]["name"] == "PyLang"
    assert tag["manifest"]["version"] == job.info["published_version"]
    assert job.info["state"] == "succeeded" and job.info["step"] == 3
    bar = capsys.readouterr().err
    assert "3/3" in bar, bar
    curve = job.curve()
    assert curve and curve[-1]["step"] == 3
    with pytest.raises(tagllm.ConflictError):
        job.cancel()
