"""The FastAPI app: OpenAI-compatible ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``.

Responses follow OpenAI's embeddings API (``openai.OpenAI(base_url=...).embeddings.create`` parses them); errors
use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. Extra request fields: ``precision``
(see :mod:`st_bitnet.serve.codec`) and ``prompt_name`` (a prompt saved with the model, e.g. ``"query"``).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import DynamicBatcher, ServerOverloaded
from .calibration import DEFAULT_CALIBRATION_TEXTS
from .codec import OutputCodec
from .limits import ServeLimits


class EmbeddingRequest(BaseModel):
    """Body of ``POST /v1/embeddings`` (OpenAI's fields + ``precision`` and ``prompt_name``)."""

    model_config = ConfigDict(extra="forbid")

    input: Any  # checked by validate_input for messages that say what is wrong
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None)
    user: StrictStr | None = None
    precision: StrictStr = "float32"
    prompt_name: StrictStr | None = None


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _is_token_ids(value: Any) -> bool:
    """OpenAI's token-id forms of ``input``: a list of ints or a list of such lists."""
    return _is_int_list(value) or (isinstance(value, list) and bool(value) and all(_is_int_list(x) for x in value))


def validate_input(value: Any, limits: ServeLimits) -> list[str]:
    """The texts of an ``input`` field, or an :class:`APIError` saying what is wrong with it.

    Raises:
        APIError: 400 for empty input, empty strings or token-id arrays (not supported: the server tokenizes
            itself), 422 for other types, 413 above ``max_inputs`` texts or ``max_input_chars`` characters.
    """
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        if not value:
            raise APIError(400, "input is an empty list: send at least one string", "input")
        if _is_token_ids(value):
            raise APIError(400, "token-id inputs (lists of integers) are not supported: send the text itself "
                                "as a string or a list of strings (this server tokenizes with the model's tokenizer)",
                           "input", "unsupported_input")
        bad = sorted({type(x).__name__ for x in value if not isinstance(x, str)})
        if bad:
            raise APIError(422, f"input must be a string or a list of strings; the list holds {bad}", "input")
        texts = value
    else:
        raise APIError(422, f"input must be a string or a list of strings, got {type(value).__name__}", "input")
    if len(texts) > limits.max_inputs:
        raise APIError(413, f"too many inputs: {len(texts)} > max_inputs={limits.max_inputs} per request; "
                            "split the request", "input", "too_many_inputs")
    for i, text in enumerate(texts):
        if not text.strip():
            raise APIError(400, f"input[{i}] is an empty string", "input")
        if len(text) > limits.max_input_chars:
            raise APIError(413, f"input[{i}] has {len(text)} characters > max_input_chars={limits.max_input_chars}",
                           "input", "input_too_long")
    return texts


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) anything above ``max_bytes`` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body of {declared} bytes > max_body_bytes={max_bytes}", None, "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:  # chunked uploads carry no content-length
            raise APIError(413, f"request body larger than max_body_bytes={max_bytes}", None, "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_message(err: ValidationError) -> tuple[int, str, str | None]:
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return 400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    if first["type"] == "model_type":
        return 422, "the request body must be a JSON object", None
    location = ".".join(str(part) for part in first["loc"])
    messages = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return 422, messages, location or None


def _token_counts(model, texts: list[str], prompt: str | None) -> np.ndarray:
    """Tokens per text as the model sees them (prompt and special tokens included, after truncation)."""
    features = model.preprocess(texts, prompt=prompt)
    return features["attention_mask"].sum(dim=1).cpu().numpy()


def _render(codec: OutputCodec, vectors: np.ndarray, tokens: np.ndarray, req: EmbeddingRequest, precision: str,
            model_name: str) -> bytes:
    """The response body: OpenAI's embeddings object (+ ``precision``/``dimensions`` for non-float32 outputs)."""
    rows = codec.convert(vectors, precision, req.dimensions)
    data = [
        {"object": "embedding", "index": i, "embedding": value}
        for i, value in enumerate(codec.serialize(rows, req.encoding_format))
    ]
    n_tokens = int(tokens.sum())
    response = {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
    if precision != "float32":
        response["precision"] = precision  # the extra fields only appear when the extra option is used
        response["dimensions"] = req.dimensions or codec.dim  # what a client needs to unpack the codes
    return json.dumps(response, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def create_app(
    model,
    *,
    model_name: str = "st-bitnet",
    limits: ServeLimits | None = None,
    calibration_texts=None,
) -> FastAPI:
    """An OpenAI-compatible embeddings app around a loaded ``SentenceTransformer``.

    The output codec is calibrated here, once (see :class:`~st_bitnet.serve.codec.OutputCodec`); the batching
    worker starts with the app (FastAPI lifespan) and stops with it.

    Args:
        model: A ``SentenceTransformer`` (``st_bitnet.load(...)`` or any other).
        model_name: The ``model`` name clients must send and that responses carry.
        limits: Request bounds and batching settings (default :class:`ServeLimits`).
        calibration_texts: Texts for post-hoc output ranges (default: the built-in list).

    Returns:
        The app; ``app.state.batcher`` and ``app.state.codec`` expose the batcher and the codec.

    Example:
        ::

            import uvicorn
            import st_bitnet
            from st_bitnet.serve import create_app

            app = create_app(st_bitnet.load("bitembed-minilm"), model_name="bitembed-minilm")
            uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    limits = limits or ServeLimits()
    codec = OutputCodec.for_model(
        model, DEFAULT_CALIBRATION_TEXTS if calibration_texts is None else calibration_texts,
        batch_size=limits.max_batch_size,
    )
    prompts = dict(getattr(model, "prompts", None) or {})
    created = int(time.time())

    def encode_batch(texts: list[str], prompt_name: str | None):
        embeddings = model.encode(
            texts, prompt_name=prompt_name, batch_size=limits.max_batch_size, convert_to_numpy=True,
            show_progress_bar=False,
        )
        # encode falls back to the model's default prompt, so the token count does too
        effective = prompt_name or getattr(model, "default_prompt_name", None)
        tokens = _token_counts(model, texts, prompts.get(effective) if effective else None)
        return np.asarray(embeddings, dtype=np.float32), tokens

    batcher = DynamicBatcher(
        encode_batch, max_batch_size=limits.max_batch_size, max_wait_ms=limits.max_wait_ms,
        max_queued_texts=limits.max_queued_texts,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="st_bitnet embeddings", version="1", lifespan=lifespan)
    app.state.batcher, app.state.codec, app.state.limits, app.state.model_name = batcher, codec, limits, model_name

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        # e.g. the model failed on a batch: every request of that batch gets this answer
        return APIError(500, f"{type(err).__name__}: {err}", error_type="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        error_type = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), error_type=error_type).response()

    def model_object() -> dict:
        return {
            "id": model_name, "object": "model", "created": created, "owned_by": "st_bitnet",
            "dimensions": codec.dim, "max_seq_length": getattr(model, "max_seq_length", None),
            "precisions": list(codec.precisions), "quantizer": codec.quantizer_source,
            "prompts": sorted(prompts),
        }

    @app.get("/health")
    async def health():
        stats = batcher.stats
        return {"status": "ok", "model": model_name, "queued_texts": batcher.queued_texts,
                "batches": stats.batches, "requests": stats.requests, "texts": stats.texts}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} not found; this server serves {model_name!r}", "model",
                           "model_not_found", "not_found_error")
        return model_object()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await _read_body(request, limits.max_body_bytes)
        try:
            req = EmbeddingRequest.model_validate_json(body)
        except ValidationError as err:
            status, message, param = _validation_message(err)
            raise APIError(status, message, param) from None
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {model_name!r}", "model",
                           "model_not_found", "not_found_error")
        texts = validate_input(req.input, limits)
        try:
            precision = codec.canonical(req.precision)
        except ValueError as err:
            raise APIError(400, str(err), "precision") from None
        try:
            codec.check_dimensions(precision, req.dimensions)
        except ValueError as err:
            raise APIError(400, str(err), "dimensions") from None
        if req.prompt_name is not None and req.prompt_name not in prompts:
            raise APIError(400, f"prompt_name {req.prompt_name!r} is not one of this model's prompts {sorted(prompts)}",
                           "prompt_name")
        try:
            vectors, tokens = await batcher.submit(texts, key=req.prompt_name)
        except ServerOverloaded as err:
            raise APIError(503, str(err), None, "overloaded", "server_error") from None
        # JSON of 2048 float vectors takes about a second: render it off the event loop so other requests
        # keep being accepted and batched meanwhile
        content = await run_in_threadpool(_render, codec, vectors, tokens, req, precision, model_name)
        return Response(content, media_type="application/json")

    return app
