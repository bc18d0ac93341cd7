"""OpenAI-compatible HTTP server over the cluster: chat and text completions, whole or streamed (SSE).

Every request is its own session on every worker, and requests run concurrently on one shared `Master`.
A generation is only ever stopped between two steps, never in the middle of a worker request (that would
leave a reply unread on the worker connection): when its client goes away or the server shuts down, the
handler closes the token generator at the next token, and the generator's `finally` ends the session on
every worker.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import functools
import os
import hmac
import json
import logging
import secrets
import signal
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from cake import eventloop
from cake.auth import is_loopback
from cake.cluster_view import ClusterView
from cake.errors import CakeError
from cake.generate import GenerationStats, LogProbs, generate
from cake.master import Master
from cake.master_setup import MasterArgs, build_master, sampling_params
from cake.sampling import SamplingParams, TokenLogProb
from cake.tokenizer import Tokenizer
from cake.topology import split_address

log = logging.getLogger("cake.api")

DEFAULT_HOST = "127.0.0.1"
ROLES = ("system", "user", "assistant")
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI allows
MAX_LOGPROBS = 5  # the completion's logprobs, as OpenAI allows
MAX_BODY = 16 << 20  # bytes: a long conversation for a 128k context is a few MiB of JSON
MAX_CONCURRENCY = 64  # generations at once (decode steps of concurrent ones are batched; a worker takes 256)
QUEUE_PER_PLACE = 4  # requests that may wait for a place, per place; past them, 429
TOKENIZE_INLINE = 4096  # characters: shorter text is tokenized on the event loop (well under a millisecond)
MAX_TOKEN_BYTES = 256  # of text one token stands for at most, in any tokenizer cake serves (Llama 3's longest: 128)
SHUTDOWN_TIMEOUT = 5.0  # seconds running requests get to wind down before their handlers are cancelled
PAGES = {"/": "chat.html", "/cluster": "cluster.html"}  # public paths -> the page each serves (cake/static)


class ApiError(CakeError):
    """A request the server refuses or cannot serve: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


@dataclass
class CompletionRequest:
    """A validated request: the prompt's token ids and how to generate and answer."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: no log-probabilities; else how many of the most likely tokens each lists
    echo: bool = False  # completions: the prompt comes back before the answer (with its log-probabilities)


# ---- request parsing ---------------------------------------------------------------------------------

_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}


def _field(body: dict, name: str, kinds: tuple[type, ...], what: str) -> object:
    """body[name] if it has one of `kinds` (JSON null counts as absent); a 400 naming the field otherwise."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise ApiError(400, f"'{name}' must be {what}, not {got}", param=name)
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = _field(body, name, (int, float), "a number")
    if value is not None and not ((low < value if low_open else low <= value) and value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"'{name}' must be in {interval}, got {value}", param=name)
    return value


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = _field(body, name, (int,), "an integer")
    if value is not None and not low <= value <= high:
        raise ApiError(400, f"'{name}' must be in [{low}, {high}], got {value}", param=name)
    return value


def parse_logprobs(body: dict, chat: bool) -> int | None:
    """How many of the most likely tokens each position lists, or None for no log-probabilities: chat's
    `logprobs` (a boolean) with `top_logprobs` (0-20, only with `logprobs: true`), or the completion's
    `logprobs` (0-5)."""
    if not chat:
        return _integer(body, "logprobs", 0, MAX_LOGPROBS)
    wanted = _field(body, "logprobs", (bool,), "a boolean")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def _content(value: object, where: str) -> str:
    """A message's content: a string, or an array of text parts (joined with newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "\n".join(p["text"] for p in value)
    raise ApiError(400, f"'{where}.content' must be a string or an array of text parts", param=f"{where}.content")


def parse_messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system message
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)} or developer, not {json.dumps(role)}",
                           param=f"{where}.role")
        messages.append({"role": role, "content": _content(m.get("content"), where)})
    return messages


def parse_stop(body: dict) -> list[str]:
    value = body.get("stop")
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string or an array of at most {MAX_STOPS} of them",
                       param="stop")
    return stops


def _refuse_what_cannot_fit(chars: int, capacity: int, param: str) -> None:
    """Text that needs more tokens than the context holds whatever the tokenizer makes of it (each token
    stands for at most MAX_TOKEN_BYTES bytes, and a character is at least one byte) is refused before it
    is tokenized: a 16 MiB body of text would hold the event loop for seconds, only to be refused after."""
    if chars > capacity * MAX_TOKEN_BYTES:
        raise ApiError(400, f"the {param} ({chars} characters) cannot fit the context of {capacity} tokens; "
                            f"shorten it", param=param, code="context_length_exceeded")


def _text_length(body: object) -> int:
    """Characters of prompt or message text a request body carries: what tokenizing spends its time on."""
    if not isinstance(body, dict):
        return 0
    messages = body.get("messages")
    texts = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    texts.append(body.get("prompt"))
    return sum(len(t) for t in texts if isinstance(t, str))


def parse_request(body: object, chat: bool, tokenizer: Tokenizer, defaults: SamplingParams, capacity: int,
                  default_max_tokens: int, vocab_size: int | None = None) -> CompletionRequest:
    """Validate an OpenAI request body; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if chat:
        messages = parse_messages(body.get("messages"))
        _refuse_what_cannot_fit(sum(len(m["content"]) for m in messages), capacity, "messages")
        try:
            prompt_ids = tokenizer.encode_chat(messages)
        except Exception as e:  # the model's own template may reject a conversation (role order, ...)
            raise ApiError(400, f"the model's chat template refused these messages: {e}", param="messages") from None
        prompt_param = "messages"
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(400, "'prompt' is required", param="prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        vocab = min(tokenizer.vocab_size, vocab_size or tokenizer.vocab_size)  # the tokenizer's and the model's
        if isinstance(prompt, str):
            _refuse_what_cannot_fit(len(prompt), capacity, "prompt")
            prompt_ids = tokenizer.encode_raw(prompt)
        elif (isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
              and all(0 <= t < vocab for t in prompt)):
            prompt_ids = list(prompt)  # token ids, as the OpenAI API allows
        else:
            raise ApiError(400, f"'prompt' must be a string or an array of token ids (0 to {vocab - 1}); this "
                                f"server takes one prompt per request", param="prompt")
        if not prompt_ids:
            raise ApiError(400, "'prompt' is empty; give at least one token of text", param="prompt")
        prompt_param = "prompt"
    n = _field(body, "n", (int,), "an integer")
    if n not in (None, 1):
        raise ApiError(400, "'n' must be 1: this server generates one choice per request", param="n")
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, max_name, (int,), "an integer")
    echo = not chat and bool(_field(body, "echo", (bool,), "a boolean"))
    if max_tokens is not None and max_tokens < (0 if echo else 1):
        raise ApiError(400, f"'{max_name}' must be at least 1{'' if chat else ' (or 0 with echo)'}, got {max_tokens}",
                       param=max_name)
    room = capacity - len(prompt_ids) + 1  # the last token generated is never fed back: it takes no position
    if room < 1:
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) leaves no room in the context of {capacity} "
                            f"tokens; shorten it", param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) + {max_name} ({max_tokens}) does not fit the "
                            f"context of {capacity} tokens; shorten the prompt or lower {max_name}",
                       param=max_name, code="context_length_exceeded")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    seed = _field(body, "seed", (int,), "an integer")
    if seed is not None and not -(1 << 63) <= seed < 1 << 64:
        raise ApiError(400, f"'seed' must fit in 64 bits, got {seed}", param="seed")
    params = replace(defaults,
                     temperature=defaults.temperature if temperature is None else float(temperature),
                     top_p=defaults.top_p if top_p is None else float(top_p),
                     seed=secrets.randbits(63) if seed is None else seed)
    stream = bool(_field(body, "stream", (bool,), "a boolean"))
    options = _field(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(_field(options, "include_usage", (bool,), "a boolean"))
    logprobs = parse_logprobs(body, chat)
    return CompletionRequest(chat, prompt_ids, min(default_max_tokens, room) if max_tokens is None else max_tokens,
                             params, parse_stop(body), stream, include_usage, logprobs, echo)


# ---- generation ---------------------------------------------------------------------------------------

def _partial_stop(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


class StopMatcher:
    """Cuts streamed text before the first stop string to appear, holding back any tail that may yet
    become one.

    Generation ends at the push that completes a stop string, so the text is cut there, before the
    earliest stop string in the text so far (a longer one that would have begun earlier is never
    completed). The concatenation of everything `push` and `flush` return is that text, or all of it when
    no stop string appears; `hit` says whether one did.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        text = self.held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[:min(found)]
        keep = max((_partial_stop(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Run:
    """One request's generation: the final text of each step, stop strings applied, its counts, and the
    log-probabilities of its tokens when asked for."""

    def __init__(self, master: Master, tokenizer: Tokenizer, eos: tuple[int, ...], req: CompletionRequest,
                 on_token: Callable[[], None] | None = None):
        self.master, self.tokenizer, self.eos, self.req = master, tokenizer, eos, req
        self.on_token = on_token  # told of each generated token (the cluster view's tokens per second)
        self.stats = GenerationStats()
        self.finish_reason = ""  # "stop" (EOS or a stop string) or "length"; "" while running
        self.logprobs = LogProbs(req.logprobs, prompt=req.echo) if req.logprobs is not None else None
        self._prompt_taken = False
        self._taken = 0  # generated tokens whose log-probabilities have been taken
        self._chars = codecs.getincrementaldecoder("utf-8")("replace")  # the text so far, for text_offset
        self._offset = 0

    async def deltas(self) -> AsyncIterator[str]:
        """Yield once per generated token ("" while nothing new is final), then once more for the rest.
        An echoed prompt comes first, with the first of them (stop strings look only at the answer)."""
        r = self.req
        decoder = self.tokenizer.stream()
        stops = StopMatcher(r.stop)
        echo = self.tokenizer.decode(r.prompt_ids) if r.echo else ""
        tokens = generate(self.master, r.prompt_ids, r.params, r.max_tokens, self.eos, self.stats, self.logprobs)
        async with aclosing(tokens):  # leaving early (stop string, closed by the handler) ends the session
            async for token in tokens:
                if self.on_token is not None:
                    self.on_token()
                text, echo = echo + stops.push(decoder.push(token)), ""
                if stops.hit:
                    self.finish_reason = "stop"
                    yield text
                    return
                yield text
        text = stops.push(decoder.flush())
        self.finish_reason = "stop" if stops.hit else self.stats.finish_reason
        yield echo + text + stops.flush()

    def take_logprobs(self, empty: bool = False) -> dict | None:
        """OpenAI's `logprobs` object for the positions not taken before (chat: `content`; completions:
        `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); None when none were asked for, or
        when none are new and not `empty`."""
        if self.logprobs is None:
            return None
        new = self._new_positions()
        if not new and not empty:
            return None
        if self.req.chat:
            return {"content": [{**self._named(e.token, e.logprob),
                                 "top_logprobs": [self._named(t, v) for t, v in e.top]} for _, e in new],
                    "refusal": None}
        offsets = []
        for token, _ in new:
            offsets.append(self._offset)
            if self.tokenizer.in_text(token):
                self._offset += len(self._chars.decode(self.tokenizer.token_bytes(token)))
        return {"tokens": [self.tokenizer.token_text(t) for t, _ in new],
                "token_logprobs": [None if e is None else e.logprob for _, e in new],
                "top_logprobs": [None if e is None else self._top(e) for _, e in new],
                "text_offset": offsets}

    def _new_positions(self) -> list[tuple[int, TokenLogProb | None]]:
        """(token, its log-probabilities) of each position not taken before: an echoed prompt's (the first
        token has none: nothing comes before it), then the answer's."""
        lp, new = self.logprobs, []
        if lp.prompt and lp.prompt_entries is not None and not self._prompt_taken:
            self._prompt_taken = True
            new += [(self.req.prompt_ids[0], None)] + [(e.token, e) for e in lp.prompt_entries]
        new += [(e.token, e) for e in lp.entries[self._taken:]]
        self._taken = len(lp.entries)
        return new

    def _named(self, token: int, logprob: float) -> dict:
        return {"token": self.tokenizer.token_text(token), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token))}

    def _top(self, e: TokenLogProb) -> dict[str, float]:
        """The completion's top_logprobs: the most likely tokens, then the chosen one if it is not among
        them (OpenAI's "up to logprobs + 1"); a name two tokens share keeps the more likely one."""
        top: dict[str, float] = {}
        for token, logprob in (*e.top, (e.token, e.logprob)):
            top.setdefault(self.tokenizer.token_text(token), logprob)
        return top

    def usage(self) -> dict:
        prompt, completion = len(self.req.prompt_ids), self.stats.generated
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Reply:
    """Builds the OpenAI response objects of one request (chat or text completion)."""

    chat: bool
    model: str
    include_usage: bool = False
    id: str = field(init=False)
    created: int = field(init=False, default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, run: Run) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text})
        choice.update(logprobs=run.take_logprobs(empty=True), finish_reason=run.finish_reason)
        return {**self._head(False), "choices": [choice], "usage": run.usage()}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=logprobs, finish_reason=finish)
        body = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # only the last chunk carries usage, as OpenAI's stream does
        return body

    def usage_chunk(self, run: Run) -> dict:
        return {**self._head(True), "choices": [], "usage": run.usage()}


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# ---- the server ---------------------------------------------------------------------------------------

class ApiServer:
    """The HTTP routes over one shared `Master`; `serve()` runs them until `stop()`."""

    def __init__(self, master: Master, tokenizer: Tokenizer, eos: tuple[int, ...], model_id: str,
                 defaults: SamplingParams, default_max_tokens: int = 256, api_key: str | None = None,
                 topology: str | None = None, max_concurrency: int = MAX_CONCURRENCY):
        self.master, self.tokenizer, self.eos = master, tokenizer, eos
        self.model_id = model_id
        self.defaults = defaults
        self.default_max_tokens = default_max_tokens
        self.api_key = api_key or None
        self.created = int(time.time())
        static = resources.files("cake") / "static"
        self.pages = {path: (static / name).read_text(encoding="utf-8") for path, name in PAGES.items()}
        self.view = ClusterView(master, model_id, topology=topology)
        self.stopping = False
        self.port = 0
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_concurrency, self.max_queued = max_concurrency, QUEUE_PER_PLACE * max_concurrency
        # One thread, so the tokenizer is never entered twice at once; long texts wait there, not on the loop.
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cake-tokenize")
        self._admitted = 0  # generating or waiting for a place
        self._places: asyncio.Semaphore | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.router.add_get("/", self.page)
        app.router.add_get("/cluster", self.page)
        app.router.add_get("/api/cluster", self.cluster)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model_id:.+}", self.model)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def serve(self, host: str, port: int, ready: Callable[[int], None] | None = None) -> None:
        """Connect to every worker, serve until `stop()`, then end running generations (each frees its
        session on every worker) and close the worker connections."""
        self._loop = asyncio.get_running_loop()
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        try:
            await self.master.connect()
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as e:
                reason = os.strerror(e.errno) if e.errno else str(e)
                raise CakeError(f"cannot listen on {host}:{port}: {reason}; pick another --api address") from None
            self.port = runner.addresses[0][1]
            self.view.address = f"{host if ':' not in host else f'[{host}]'}:{self.port}"
            self.view.start()
            log.info("OpenAI-compatible API for '%s' on http://%s/v1 (chat page at /, the cluster at /cluster)",
                     self.model_id, self.view.address)
            if ready:
                ready(self.port)
            await self._stop.wait()
            log.info("stopping: ending running generations")
        finally:
            self.stopping = True
            await runner.cleanup()
            await self.view.close()
            await self.master.close()
            self._tokenizing.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    def stop(self) -> None:
        """Ask `serve()` to finish; safe from any thread and from signal handlers."""
        self.stopping = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    # ---- middleware: authentication and every error as an OpenAI-style body --------------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            if self.api_key and request.path not in PAGES:  # the pages are public; what they fetch is not
                self._authenticate(request)
            return await handler(request)
        except ApiError as e:
            response = e.response()
            if e.status == 429:
                response.headers["Retry-After"] = "1"
            return response
        except CakeError as e:  # the cluster could not serve it: a worker is down or failing
            log.warning("%s %s failed: %s", request.method, request.path, e)
            return ApiError(503, str(e), kind="server_error", code="cluster_unavailable").response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = (f"no endpoint {request.method} {request.path}; this server has GET /v1/models[/ID], "
                       f"POST /v1/chat/completions, POST /v1/completions and GET /api/cluster"
                       if e.status in (404, 405)
                       else e.reason)
            return ApiError(e.status, message).response()

    def _authenticate(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>' with the server's "
                                "--api-key", code="invalid_api_key")

    # ---- routes ------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=self.pages[request.path], content_type="text/html")

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(self.view.snapshot().to_json())

    def _model_card(self) -> dict:
        config = self.master.config
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "cake",
                "architecture": config.arch, "context_length": self.master.capacity}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        asked = request.match_info["model_id"]
        if asked != self.model_id:
            raise ApiError(404, f"no model '{asked}' here; this server serves '{self.model_id}'", param="model",
                           code="model_not_found")
        return web.json_response(self._model_card())

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        except RecursionError:  # Python's parser gives up on deep nesting: the client's doing, not a 500
            raise ApiError(400, "the request body nests too deep") from None
        if self._admitted >= self.max_concurrency + self.max_queued:
            raise ApiError(429, f"this server is busy: {self.max_concurrency} generations running and "
                                f"{self.max_queued} waiting; try again shortly", kind="requests",
                           code="rate_limit_exceeded")
        if self._places is None:
            self._places = asyncio.Semaphore(self.max_concurrency)
        self._admitted += 1
        try:
            async with self._places:
                return await self._generate(request, body, chat)
        finally:
            self._admitted -= 1

    async def _generate(self, request: web.Request, body: object, chat: bool) -> web.StreamResponse:
        parse = functools.partial(parse_request, body, chat, self.tokenizer, self.defaults, self.master.capacity,
                                  self.default_max_tokens, self.master.config.vocab_size)
        if _text_length(body) > TOKENIZE_INLINE:  # other requests, /v1/models too, are answered meanwhile
            req = await asyncio.get_running_loop().run_in_executor(self._tokenizing, parse)
        else:
            req = parse()
        if self.stopping:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        run = Run(self.master, self.tokenizer, self.eos, req, on_token=self.view.token)
        reply = Reply(chat, self.model_id, req.include_usage)
        t0 = time.perf_counter()
        self.view.opened()
        try:
            if req.stream:
                response = await self._stream(request, run, reply)
            else:
                response = await self._whole(request, run, reply)
        finally:
            self.view.closed()
        log.info("%s: %d prompt + %d generated tokens (%s) in %.2fs", reply.id, len(req.prompt_ids),
                 run.stats.generated, run.finish_reason or "interrupted", time.perf_counter() - t0)
        return response

    def _interrupted(self, request: web.Request) -> str | None:
        if self.stopping:
            return "the server is shutting down"
        if request.transport is None or request.transport.is_closing():
            return "the client went away"
        return None

    async def _whole(self, request: web.Request, run: Run, reply: Reply) -> web.Response:
        parts = []
        async with aclosing(run.deltas()) as deltas:
            async for text in deltas:
                reason = self._interrupted(request)
                if reason:
                    log.info("%s: %s after %d tokens; generation stopped", reply.id, reason, run.stats.generated)
                    raise ApiError(503, f"generation stopped: {reason}", kind="server_error")
                parts.append(text)
        return web.json_response(reply.whole("".join(parts), run))

    async def _stream(self, request: web.Request, run: Run, reply: Reply) -> web.StreamResponse:
        # The response starts with the first token, so a cluster that cannot prefill is still a plain 503.
        response: web.StreamResponse | None = None
        try:
            async with aclosing(run.deltas()) as deltas:
                async for text in deltas:
                    reason = self._interrupted(request)
                    if reason:
                        log.info("%s: %s after %d tokens; generation stopped", reply.id, reason,
                                 run.stats.generated)
                        error = ApiError(503, f"generation stopped: {reason}", kind="server_error")
                        if response is None:
                            raise error
                        if self.stopping:
                            await response.write(_sse(error.body()))
                        return response
                    if response is None:
                        response = await self._open_stream(request)
                        if reply.chat:
                            await response.write(_sse(reply.chunk("", role=True)))
                    if text:  # with the log-probabilities of the tokens since the last chunk
                        await response.write(_sse(reply.chunk(text, logprobs=run.take_logprobs())))
            response = response or await self._open_stream(request)
            await response.write(_sse(reply.chunk(None, run.finish_reason, logprobs=run.take_logprobs())))
            if reply.include_usage:
                await response.write(_sse(reply.usage_chunk(run)))
            await response.write(_sse("[DONE]"))
            await response.write_eof()
        except ConnectionError:  # the client closed the stream between our check and the write
            log.info("%s: the client went away after %d tokens; generation stopped", reply.id, run.stats.generated)
        except CakeError as e:
            if response is None or isinstance(e, ApiError):
                raise
            log.warning("%s failed mid-stream: %s", reply.id, e)
            error = ApiError(503, str(e), kind="server_error", code="cluster_unavailable")
            try:  # OpenAI's clients raise on an error event in the stream
                await response.write(_sse(error.body()))
            except ConnectionError:
                pass
        return response

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        return response


# ---- start-up from the CLI ----------------------------------------------------------------------------

def parse_api_address(value: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or a bare 'PORT' (on 127.0.0.1)."""
    value = value.strip()
    parsed = (DEFAULT_HOST, int(value)) if value.isdigit() and 0 < int(value) < 65536 else split_address(value)
    if parsed is None:
        raise CakeError(f"--api '{value}' needs HOST:PORT or PORT with a port between 1 and 65535, "
                        f"e.g. --api 127.0.0.1:8080")
    return parsed


def build_server(args: MasterArgs, api_key: str | None = None, max_concurrency: int = MAX_CONCURRENCY) -> ApiServer:
    """The master, tokenizer and defaults of `cake --api`: the sampling flags, else generation_config.json
    (greedy when it does not sample), and --max-tokens become the defaults of requests that omit them."""
    if args.max_tokens < 1:
        raise CakeError("--max-tokens (the API's default max_tokens) must be at least 1")
    defaults = sampling_params(args)
    master, tokenizer, eos = build_master(args, compute_in_thread=True)  # local maths off the event loop
    return ApiServer(master, tokenizer, eos, Path(args.model_dir).resolve().name, defaults, args.max_tokens, api_key,
                     args.topology, max_concurrency)


def run_api(args: MasterArgs, address: str, api_key: str | None = None,
            max_concurrency: int = MAX_CONCURRENCY) -> None:
    """`cake --mode master --api HOST:PORT`: serve the cluster until SIGINT/SIGTERM."""
    host, port = parse_api_address(address)
    eventloop.busy_poll_us("cpu", args.busy_poll)  # a bad value fails before the weights load
    server = build_server(args, api_key, max_concurrency)
    if not is_loopback(host) and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the cluster", host)
    eventloop.run(_serve_until_signalled(server, host, port), eventloop.busy_poll_us(server.master.device.type,
                                                                                     args.busy_poll))


async def _serve_until_signalled(server: ApiServer, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, server.stop)
        except NotImplementedError:  # Windows: Ctrl-C arrives as KeyboardInterrupt instead
            pass
    await server.serve(host, port)
