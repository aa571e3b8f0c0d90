"""The OpenAI-compatible HTTP API of `llamaduo serve` (FastAPI)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaduo_inferencer.serve.engine import (
    DEFAULT_MAX_BATCH_SIZE,
    ChatEngine,
    ChatRequest,
    EngineClosedError,
    GenerationError,
    InvalidRequestError,
    OutputValidationError,
    PreparedRequest,
    StreamDelta,
    StreamEnd,
    UnknownModelError,
    json_schema_of,
)
from llamaduo_inferencer.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    ErrorBody,
    ErrorDetail,
    ModelCard,
    ModelList,
    Usage,
)

logger = logging.getLogger(__name__)


def error_response(
    status: int, message: str, error_type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """Return OpenAI's error body with `status`."""
    body = ErrorBody(error=ErrorDetail(message=message, type=error_type, param=param, code=code))
    return JSONResponse(status_code=status, content=body.model_dump())


def _to_engine_request(body: ChatCompletionRequest) -> ChatRequest:
    return ChatRequest(
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        messages=[
            {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
            for message in body.messages
        ],
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.token_limit(),
        stop=body.stop_strings(),
        seed=body.seed,
        json_schema=json_schema_of(body.response_format),
    )


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


def create_app(engine: ChatEngine) -> FastAPI:
    """Build the FastAPI app serving `engine` under /v1 (chat completions, models) and /health."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="llamaduo serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()) if p != 'body') or 'body'}: {item.get('msg')}"
            for item in error.errors()
        )
        return error_response(400, message, "invalid_request_error", ".".join(location) or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        error_type = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(error.status_code, str(error.detail), error_type)

    @app.exception_handler(UnknownModelError)
    async def on_unknown_model(request: Request, error: UnknownModelError) -> JSONResponse:
        return error_response(404, str(error), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(InvalidRequestError)
    async def on_invalid_request(request: Request, error: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(error), "invalid_request_error", error.param)

    @app.exception_handler(OutputValidationError)
    async def on_invalid_output(request: Request, error: OutputValidationError) -> JSONResponse:
        return error_response(500, str(error), "server_error", "response_format", "schema_validation_failed")

    @app.exception_handler(GenerationError)
    async def on_generation_error(request: Request, error: GenerationError) -> JSONResponse:
        return error_response(500, str(error), "server_error")

    @app.exception_handler(EngineClosedError)
    async def on_engine_closed(request: Request, error: EngineClosedError) -> JSONResponse:
        return error_response(503, str(error), "server_error", code="service_unavailable")

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "model": engine.base_name, "adapters": list(engine.adapter_names)}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=engine.created) for name in engine.model_names()])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        prepared = await engine.prepare(body.model, _to_engine_request(body))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(engine, prepared, completion_id, created, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completions = await engine.complete(prepared)
        prompt_tokens = completions[0].prompt_tokens
        completion_tokens = sum(completion.completion_tokens for completion in completions)
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=body.model,
            choices=[
                Choice(index=index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                for index, c in enumerate(completions)
            ],
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    return app


async def _stream(
    engine: ChatEngine,
    prepared: PreparedRequest,
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        body = ChatCompletionChunk(
            id=completion_id, created=created, model=prepared.model_name, choices=choices, usage=usage
        )
        data = body.model_dump()
        # OpenAI's chunks always carry finish_reason (null until the end) but only the delta fields that are set.
        for choice in data["choices"]:
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
        if usage is None:
            del data["usage"]
        return _sse(json.dumps(data))

    # The status line is sent before generation starts, so errors from here on travel as an error event.
    try:
        for index in range(prepared.request.n):
            yield chunk([ChunkChoice(index=index, delta=ChoiceDelta(role="assistant", content=""))])
        # aclosing: a client that goes away closes this generator, and with it the engine's stream, which cancels
        # the generation at once rather than whenever the garbage collector gets to it.
        async with contextlib.aclosing(engine.stream(prepared)) as items:
            async for item in items:
                if isinstance(item, StreamDelta):
                    if item.text or item.finish_reason:
                        delta = ChoiceDelta(content=item.text) if item.text else ChoiceDelta()
                        yield chunk([ChunkChoice(index=item.index, delta=delta, finish_reason=item.finish_reason)])
                elif isinstance(item, StreamEnd) and include_usage:
                    prompt_tokens = item.completions[0].prompt_tokens
                    completion_tokens = sum(completion.completion_tokens for completion in item.completions)
                    yield chunk(
                        [],
                        Usage(
                            prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens,
                        ),
                    )
    except (InvalidRequestError, OutputValidationError) as error:
        error_type = "invalid_request_error" if isinstance(error, InvalidRequestError) else "server_error"
        body = ErrorBody(error=ErrorDetail(message=str(error), type=error_type))
        yield _sse(body.model_dump_json())
    except Exception as error:
        logger.exception("streaming generation failed")
        yield _sse(ErrorBody(error=ErrorDetail(message=str(error), type="server_error")).model_dump_json())
    yield _sse("[DONE]")


def run_server(
    model: str,
    *,
    host: str,
    port: int,
    adapters: Mapping[str, Path],
    model_cache: Path,
    served_name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> None:
    """Load `model` (and its adapters) and serve the OpenAI-compatible API with uvicorn until interrupted.

    Concurrent requests are batched together, up to `max_batch_size` generated rows per step.
    """
    import uvicorn

    from llamaduo.localmodel import LocalModelSettings

    settings = LocalModelSettings()
    engine = ChatEngine.load(
        model,
        adapters=adapters,
        model_cache=model_cache,
        served_name=served_name,
        device=settings.device,
        max_batch_size=max_batch_size,
    )
    # log_config=None: uvicorn logs through the process's own (JSON) logging instead of its own handlers.
    uvicorn.run(create_app(engine), host=host, port=port, log_level="info", log_config=None)
