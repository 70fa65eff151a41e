"""HTTP API over the engine: OpenAI (`/v1/completions`, `/v1/chat/completions`,
`/v1/models`) and Text Generation Inference (`/generate`, `/generate_stream`,
`/info`, `/health`) routes, server-sent-event streaming, Prometheus `/metrics`.

Client mistakes get a 4xx JSON error (422 invalid request, 401 bad API key, 404
unknown model, 429 too many requests in flight), never a 500; the engine keeps
serving whatever a request contained. A client that goes away (mid-stream, or
while waiting for a whole answer) cancels its request: its slot is freed at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from maxllm.posttrain.chat import ChatTemplate, TemplateError
from maxllm.posttrain.records import TextEncoder
from maxllm.serve.engine import Engine, Request, Result, SamplingParams, Token

# Used when the tokenizer brings no chat template (ChatML).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


TURN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


class ClientError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclasses.dataclass
class ServerConfig:
    model_name: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int = 128
    api_key: str | None = None
    chat_template: str | None = None
    dtype: str = "bfloat16"


# ---------------------------------------------------------------------------------
# Request schemas


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _OpenAIBody(_Body):
    """Fields both OpenAI routes take (top_k and repetition_penalty as vLLM adds them)."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionBody(_OpenAIBody):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatBody(_OpenAIBody):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False


class TGIParameters(_Body):
    max_new_tokens: int = Field(20, ge=1)
    temperature: float | None = Field(None, gt=0.0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    do_sample: bool = False
    seed: int | None = None
    stop: list[str] = []
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False


class TGIBody(_Body):
    inputs: str = Field(min_length=1)
    parameters: TGIParameters = TGIParameters()
    stream: bool = False


# ---------------------------------------------------------------------------------


class Generation:
    """One request handed to the engine: its events as they come, and cancel()."""

    def __init__(self, request: Request, events: asyncio.Queue):
        self.request, self.queue = request, events

    def cancel(self) -> None:
        self.request.cancel()

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """("token", Token) events, then ("done", Result)."""
        while True:
            kind, value = await self.queue.get()
            yield kind, value
            if kind == "done":
                return


class EventStream(StreamingResponse):
    """Server-sent events of one generation. However the response ends (the last
    event sent, the client gone mid-stream, the server stopping), the generation
    is cancelled, which frees its slot at the engine's next step (a no-op when it
    has finished)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], generation: Generation):
        super().__init__(content)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


async def _disconnected(http: HTTPRequest) -> None:
    """Returns when the client closes the connection (its body already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class Server:
    def __init__(self, engine: Engine, tokenizer, cfg: ServerConfig):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.in_flight = 0
        # Chat prompts are rendered and tokenized as fine-tuning renders them: the
        # tokenizer's BOS and EOS strings bound, special tokens matched in the text.
        self.chat_encoder = TextEncoder(tokenizer)
        self.template = ChatTemplate(cfg.chat_template or DEFAULT_CHAT_TEMPLATE,
                                     bos_token=self.chat_encoder.bos_token, eos_token=self.chat_encoder.eos_token)
        # A chat answer also ends at its template's end-of-turn marker (a model fine-tuned with
        # ChatML on a tokenizer whose EOS is </s> writes "<|im_end|>\n</s>").
        self.turn_ends = tuple(m for m in TURN_END_MARKERS if m in self.template.source)
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("maxllm_requests", "HTTP requests", ["route", "status"], registry=r)
        self.m_tokens_in = Counter("maxllm_prompt_tokens", "prompt tokens received", registry=r)
        self.m_tokens_out = Counter("maxllm_generated_tokens", "tokens generated", registry=r)
        self.m_queue = Gauge("maxllm_queue_depth", "requests waiting for a slot", registry=r)
        self.m_running = Gauge("maxllm_running_requests", "requests holding a slot", registry=r)
        self.m_queue.set_function(lambda: engine.queue_depth)  # read when scraped
        self.m_running.set_function(lambda: engine.busy_slots)
        self.m_in_flight = Gauge("maxllm_requests_in_flight", "requests admitted that the engine has not ended "
                                 "(waiting or holding a slot); max_concurrent_requests bounds it", registry=r)
        self.m_in_flight.set_function(lambda: self.in_flight)
        self.m_finished = Counter("maxllm_finished_requests", "requests the engine ended, by reason "
                                  "(eos, stop, length, cancelled: the client went away, error)", ["reason"], registry=r)
        self.m_ttft = Histogram("maxllm_time_to_first_token_seconds", "time to first token", registry=r,
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.m_tpot = Histogram("maxllm_time_per_output_token_seconds", "time per output token after the first",
                                registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

    # ------------------------------------------------------------------ checks

    def check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise ClientError(404, f"model {name!r} not found; this server serves {self.cfg.model_name!r}",
                              "model_not_found", "model")

    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        if not ids:
            raise ClientError(422, "the prompt is empty", param="prompt")
        if any(not 0 <= t < self.engine.vocab for t in ids):
            raise ClientError(422, f"token ids must be in [0, {self.engine.vocab})", param="prompt")
        if len(ids) > self.cfg.max_input_tokens:
            raise ClientError(422, f"the prompt has {len(ids)} tokens; max_input_tokens is {self.cfg.max_input_tokens}",
                              param="prompt")
        return ids

    def check_total(self, ids: list[int], max_new: int) -> None:
        if len(ids) + max_new > self.cfg.max_total_tokens:
            raise ClientError(422, f"prompt ({len(ids)} tokens) + max new tokens ({max_new}) exceeds "
                                   f"max_total_tokens={self.cfg.max_total_tokens}", param="max_tokens")

    # ------------------------------------------------------------------ running requests

    def admit(self, ids: list[int], params: SamplingParams, stream: bool) -> Generation:
        """Hands one request to the engine, or answers 429 while
        `max_concurrent_requests` are in flight. A request is in flight until the
        engine ends it (finished, failed, or cancelled and its slot freed), so the
        limit bounds what the engine holds, not what clients are still reading."""
        if self.in_flight >= self.cfg.max_concurrent_requests:
            raise ClientError(429, f"{self.in_flight} requests in flight; max_concurrent_requests is "
                                   f"{self.cfg.max_concurrent_requests}; retry later", "rate_limit_error")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def ended(result: Result) -> None:  # on the event loop, after the request's last token
            self.in_flight -= 1
            self._record(result)
            events.put_nowait(("done", result))

        request = Request(
            ids, params,
            on_token=(lambda t: loop.call_soon_threadsafe(events.put_nowait, ("token", t))) if stream else None,
            on_done=lambda result: loop.call_soon_threadsafe(ended, result),
        )
        self.engine.submit(request)
        self.in_flight += 1
        self.m_tokens_in.inc(len(ids))
        return Generation(request, events)

    async def complete(self, http: HTTPRequest, ids: list[int], params: SamplingParams) -> Result:
        """Runs one request to its end. A client that goes away first cancels it
        and is answered 499 (client closed request), which nobody reads."""
        generation = self.admit(ids, params, stream=False)
        result = asyncio.ensure_future(generation.queue.get())
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait((result, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            answered = result.done()
            if not answered:
                result.cancel()
                generation.cancel()
        if not answered:
            raise ClientError(499, "the client closed the connection before the answer", "client_closed_request")
        return result.result()[1]

    def _record(self, result: Result) -> None:
        n = len(result.tokens)
        self.m_finished.labels(result.finish_reason).inc()
        self.m_tokens_out.inc(n)
        if n:
            self.m_ttft.observe(result.time_to_first_token)
        if n > 1:
            self.m_tpot.observe(result.decode_seconds / (n - 1))

    @staticmethod
    def engine_device() -> str:
        import jax

        return jax.devices()[0].platform

    def chat_ids(self, messages: list[Message]) -> list[int]:
        try:
            text = self.template.render([m.model_dump() for m in messages], add_generation_prompt=True)
        except TemplateError as e:
            raise ClientError(422, str(e), param="messages") from None
        return self.encode(self.chat_encoder.encode(text, [])[0])


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 8 or any(not s for s in stops):
        raise ClientError(422, "stop: at most 8 non-empty strings", param="stop")
    return stops


def _openai_reason(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def _tgi_reason(reason: str) -> str:
    return {"eos": "eos_token", "stop": "stop_sequence", "length": "length"}.get(reason, reason)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="maxllm", docs_url=None, redoc_url=None)
    cfg = server.cfg

    def openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                            status_code=status)

    def error(request: HTTPRequest, status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        server.m_requests.labels(request.url.path, str(status)).inc()
        if request.url.path.startswith("/v1"):
            response = openai_error(status, message, kind, param)
        else:
            response = JSONResponse({"error": message, "error_type": kind}, status_code=status)
        if status == 429:
            response.headers["Retry-After"] = "1"  # a place frees as soon as any request ends
        return response

    @app.exception_handler(ClientError)
    async def _client_error(request: HTTPRequest, e: ClientError):
        return error(request, e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        return error(request, 422, problems or "invalid request", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HTTPRequest, e: StarletteHTTPException):
        return error(request, e.status_code, str(e.detail), "invalid_request_error")

    @app.middleware("http")
    async def _auth_and_count(request: HTTPRequest, call_next):
        if cfg.api_key and request.url.path not in ("/health", "/metrics"):
            if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                return error(request, 401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        response = await call_next(request)
        if response.status_code < 400:
            server.m_requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    # ------------------------------------------------------------------ OpenAI

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "maxllm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        server.check_model(body.model)
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                raise ClientError(422, "one prompt per request (send several requests instead)", param="prompt")
            prompt: str | list[int] = body.prompt[0]
        else:
            prompt = body.prompt
        ids = server.encode(prompt)
        max_new = body.max_tokens or 16
        server.check_total(ids, max_new)
        params = SamplingParams(max_new, body.temperature, body.top_k, body.top_p, body.repetition_penalty, body.seed,
                                _stops(body.stop), prompt_logprobs=body.echo and body.logprobs is not None)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo_text = server.tokenizer.decode(ids) if body.echo else ""

        def logprobs_of(result: Result) -> dict | None:
            if body.logprobs is None:
                return None
            tokens = [server.tokenizer.decode([t.id]) for t in result.tokens]
            lps = [t.logprob for t in result.tokens]
            if body.echo:
                tokens = [server.tokenizer.decode([i]) for i in ids] + tokens
                lps = (result.prompt_logprobs or [None] * len(ids)) + lps
            return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": None}

        if body.stream:
            generation = server.admit(ids, params, stream=True)

            async def events():
                if echo_text:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                                "choices": [{"index": 0, "text": echo_text, "logprobs": None, "finish_reason": None}]})
                async for kind, value in generation.events():
                    if kind == "token" and value.text:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                                    "choices": [{"index": 0, "text": value.text, "logprobs": None, "finish_reason": None}]})
                    elif kind == "done":
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                                    "choices": [{"index": 0, "text": "", "logprobs": None,
                                                 "finish_reason": _openai_reason(value.finish_reason)}]})
                yield "data: [DONE]\n\n"
            return EventStream(events(), generation)

        result = await server.complete(http, ids, params)
        return {
            "id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
            "choices": [{"index": 0, "text": echo_text + result.text, "logprobs": logprobs_of(result),
                         "finish_reason": _openai_reason(result.finish_reason)}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(result.tokens),
                      "total_tokens": len(ids) + len(result.tokens)},
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        server.check_model(body.model)
        ids = server.chat_ids(body.messages)
        max_new = body.max_completion_tokens or body.max_tokens or (cfg.max_total_tokens - len(ids))
        if max_new < 1:
            raise ClientError(422, "the conversation leaves no room for an answer", param="messages")
        server.check_total(ids, max_new)
        params = SamplingParams(max_new, body.temperature, body.top_k, body.top_p, body.repetition_penalty, body.seed,
                                _stops(body.stop) + server.turn_ends)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, reason: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if body.stream:
            generation = server.admit(ids, params, stream=True)

            async def events():
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
                async for kind, value in generation.events():
                    if kind == "token" and value.text:
                        yield _sse(chunk({"content": value.text}, None))
                    elif kind == "done":
                        yield _sse(chunk({}, _openai_reason(value.finish_reason)))
                yield "data: [DONE]\n\n"
            return EventStream(events(), generation)

        result = await server.complete(http, ids, params)
        logprobs = None
        if body.logprobs:
            logprobs = {"content": [{"token": server.tokenizer.decode([t.id]), "logprob": t.logprob, "bytes": None,
                                     "top_logprobs": []} for t in result.tokens]}
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": logprobs,
                         "finish_reason": _openai_reason(result.finish_reason)}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(result.tokens),
                      "total_tokens": len(ids) + len(result.tokens)},
        }

    # ------------------------------------------------------------------ TGI

    def tgi_params(p: TGIParameters, ids: list[int]) -> SamplingParams:
        server.check_total(ids, p.max_new_tokens)
        sampling = p.do_sample or p.temperature is not None and p.temperature != 1.0 or p.top_k or p.top_p
        return SamplingParams(
            p.max_new_tokens, (p.temperature or 1.0) if sampling else 0.0, p.top_k or 0, p.top_p or 1.0,
            p.repetition_penalty or 1.0, p.seed, _stops(p.stop), prompt_logprobs=p.decoder_input_details,
        )

    def tgi_token(t: Token) -> dict:
        text = t.text or server.tokenizer.decode([t.id])  # non-streamed tokens carry no text of their own
        return {"id": t.id, "text": text, "logprob": t.logprob, "special": t.id == server.engine.eos_id}

    def tgi_details(result: Result, p: TGIParameters, ids: list[int]) -> dict:
        details = {"finish_reason": _tgi_reason(result.finish_reason), "generated_tokens": len(result.tokens),
                   "seed": p.seed, "tokens": [tgi_token(t) for t in result.tokens if t.id >= 0]}
        if p.decoder_input_details:
            lps = result.prompt_logprobs or [None] * len(ids)
            details["prefill"] = [{"id": i, "text": server.tokenizer.decode([i]), "logprob": lp} for i, lp in zip(ids, lps)]
        else:
            details["prefill"] = []
        return details

    @app.post("/generate")
    async def generate(body: TGIBody, http: HTTPRequest):
        ids = server.encode(body.inputs)
        p = body.parameters
        result = await server.complete(http, ids, tgi_params(p, ids))
        text = (body.inputs if p.return_full_text else "") + result.text
        out: dict[str, Any] = {"generated_text": text}
        if p.details:
            out["details"] = tgi_details(result, p, ids)
        return out

    @app.post("/generate_stream")
    async def generate_stream(body: TGIBody):
        ids = server.encode(body.inputs)
        p = body.parameters
        generation = server.admit(ids, tgi_params(p, ids), stream=True)

        async def events():
            index = 0
            async for kind, value in generation.events():
                if kind == "token" and value.id >= 0:
                    index += 1
                    yield _sse({"index": index, "token": tgi_token(value), "generated_text": None, "details": None})
                elif kind == "done":
                    final = {"finish_reason": _tgi_reason(value.finish_reason),
                             "generated_tokens": len(value.tokens), "seed": p.seed}
                    yield _sse({"index": index + 1, "token": {"id": -1, "text": "", "logprob": 0.0, "special": True},
                                "generated_text": value.text, "details": final})

        return EventStream(events(), generation)

    @app.get("/info")
    async def info():
        return {"model_id": cfg.model_name, "model_dtype": cfg.dtype, "model_device_type": server.engine_device(),
                "max_input_tokens": cfg.max_input_tokens, "max_total_tokens": cfg.max_total_tokens,
                "max_concurrent_requests": cfg.max_concurrent_requests, "max_batch_size": server.engine.slots,
                "router": "maxllm", "version": "0.1.0"}

    @app.get("/health")
    async def health():
        alive = server.engine._thread is not None and server.engine._thread.is_alive()
        return JSONResponse({} if alive else {"error": "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.registry).decode(), media_type="text/plain; version=0.0.4")

    return app
