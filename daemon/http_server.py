"""The OpenAI-compatible HTTP front end: routes, the access key, and its place in the daemon.

aiohttp serves it inside the daemon's own event loop, beside the Unix socket. Every route
turns its request into the daemon's typed protocol requests (`agentd.openai_compat`
translates) and goes through `Daemon.handle`, so HTTP and socket clients share one
scheduler, one set of limits and one set of errors; nothing here touches MLX or records.

Access: a loopback port is open to every local user, so every request needs
`Authorization: Bearer <key>` with the key from `<home>/http-token` (0600, made at first
start). The read-only status page at `/` also takes the HttpOnly cookie that `/login?key=`
sets (what `agentctl open` opens): an HMAC of the key, not the key, and the API routes never
take it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from aiohttp import web

from . import openai_compat as oc
from . import protocol as p
from .atomic import atomic_write_bytes
from .core import Daemon
from .status_page import render_status_page, render_login_needed

log = logging.getLogger("agentd.http")

DEFAULT_HTTP = "127.0.0.1:8731"
TOKEN_FILE = "http-token"
COOKIE = "agentd_key"
MAX_BODY_BYTES = p.MAX_TURN_BYTES + 1024 * 1024  # a turn's text plus the JSON around it


class HttpConfigError(Exception):
    """An --http value that cannot be used; the message says why."""


def parse_address(value: str, allow_remote: bool = False) -> tuple[str, int] | None:
    """`off`, `HOST:PORT` or `:PORT` (loopback) as (host, port); None for off.

    A non-loopback host is refused unless `allow_remote`: the key is the only guard there.
    """
    value = value.strip()
    if value.lower() in ("off", "no", "false", "0", ""):
        return None
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise HttpConfigError(f"--http {value!r}: expected HOST:PORT (e.g. {DEFAULT_HTTP}), :PORT or off")
    host = host.strip("[]") or "127.0.0.1"
    if host != "localhost" and not allow_remote:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise HttpConfigError(f"--http {value!r}: give a loopback IP address (127.0.0.1 or ::1)") from None
        if not loopback:
            raise HttpConfigError(f"--http {value!r} is not a loopback address; add --http-allow-remote to "
                                  "serve other machines (anyone who has the key can then use every agent)")
    return host, int(port_text)


def ensure_token(home: Path) -> str:
    """The access key in `<home>/http-token`: created at first start (0600), kept after."""
    path = Path(home) / TOKEN_FILE
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o); made it 0600", path, mode)
            os.chmod(path, 0o600)
        token = path.read_text().strip()
        if len(token) >= 32:
            return token
        log.warning("%s held no usable key; writing a new one", path)
    token = secrets.token_urlsafe(32)
    atomic_write_bytes(path, (token + "\n").encode(), mode=0o600)
    return token


def _error_response(err: oc.ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


class HttpFrontEnd:
    """Serves the routes below on `address` until `stop`; records what it bound in
    `daemon.http` so `agentctl status` and `agentctl http-env` can find it."""

    def __init__(self, daemon: Daemon, home: Path, address: tuple[str, int]):
        self.daemon = daemon
        self.address = address
        self.token_file = Path(home) / TOKEN_FILE
        self.token = ensure_token(home)
        self._ids = itertools.count(1 << 48)  # request ids of HTTP requests, apart from socket ones in logs
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        self.app.router.add_get("/", self.status_page)
        self.app.router.add_get("/login", self.login)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/responses", self.create_response)
        self.app.router.add_get("/v1/responses/{response_id}", self.get_response)
        self.app.router.add_get("/v1/agents/{name}/export", self.export_agent)
        self.app.router.add_post("/v1/agents/import", self.import_agent)

    async def start(self) -> str:
        """Bind and serve; returns 'host:port' as bound (port 0 picks a free one)."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address[0], self.address[1], reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        host, port = site._server.sockets[0].getsockname()[:2]
        bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.daemon.http = {"address": bound, "base_url": f"http://{bound}/v1", "token_file": str(self.token_file)}
        log.info("OpenAI-compatible HTTP on http://%s/v1 (key in %s)", bound, self.token_file)
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.daemon.http = None

    # ---- middlewares ----------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every failure leaves as OpenAI's error body; a traceback never does."""
        try:
            return await handler(request)
        except oc.ApiError as e:
            return _error_response(e)
        except p.ProtocolError as e:
            return _error_response(oc.api_error(e.code.value, e.message))
        except web.HTTPRequestEntityTooLarge:
            return _error_response(oc.ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                                               code="request_too_large"))
        except web.HTTPException as e:
            return _error_response(oc.ApiError(e.status, e.reason, code=e.reason.lower().replace(" ", "_")))
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away: nobody to answer
        except Exception as e:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return _error_response(oc.ApiError(500, f"{type(e).__name__}: {e}", type="server_error"))

    def _key_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    def _page_cookie(self) -> str:
        """The status page's cookie value: derived from the key, not the key, so a cookie
        that leaks (a browser profile, a backup) opens the read-only page and not the API."""
        return hmac.new(self.token.encode(), b"agentd status page", "sha256").hexdigest()

    def _cookie_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self._page_cookie().encode())

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path == "/login":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        bearer = header[7:].strip() if header[:7].lower() == "bearer " else None
        if self._key_ok(bearer) or (request.path == "/" and self._cookie_ok(request.cookies.get(COOKIE))):
            return await handler(request)
        if request.path == "/":
            return web.Response(text=render_login_needed(), content_type="text/html", status=401)
        why = "no key given" if not header else "the key is wrong"
        raise oc.ApiError(401, f"{why}: send 'Authorization: Bearer <key>' with the key from {self.token_file} "
                               "(`agentctl http-env` prints it)", code="invalid_api_key")

    # ---- the daemon -----------------------------------------------------------------

    async def _call(self, request: web.Request, req: p.Request, on_frame=None) -> dict:
        """`req` through `Daemon.handle`: the result's fields, or ApiError. Streamed frames
        go to `on_frame`; a client that disconnects makes the heartbeat raise, which cancels
        the turn as a dropped socket does."""
        async def emit(frame: dict | None) -> None:
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the HTTP client went away")
            if frame is not None and on_frame is not None:
                await on_frame(frame)

        reply = await self.daemon.handle(next(self._ids), req, emit)
        if reply["type"] == "error":
            raise oc.api_error(reply["code"], reply["message"])
        return {k: v for k, v in reply.items() if k not in ("id", "type")}

    async def _build(self, cls: type[p.Request], **fields) -> p.Request:
        try:
            return cls(**fields)
        except TypeError as e:
            raise oc.bad(str(e)) from None

    async def _body(self, request: web.Request) -> dict:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise oc.bad(f"the body is not valid JSON: {e}") from None

    async def _ensure_agent(self, request: web.Request, name: str, system: str | None) -> None:
        """Agents are created on first use, with the request's system prompt."""
        try:
            await self._call(request, p.Show(name))
        except oc.ApiError as e:
            if e.code != "not_found":
                raise
            try:
                await self._call(request, p.Create(name, system=system or ""))
            except oc.ApiError as e2:
                if e2.code != "already_exists":  # a concurrent first request made it
                    raise

    # ---- routes ---------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        agents = (await self._call(request, p.List()))["agents"]
        now = int(time.time())
        data = [{"id": self.daemon.engine.model_id, "object": "model", "created": now, "owned_by": "agentd"}]
        data += [{"id": oc.AGENT_PREFIX + a["name"], "object": "model", "created": int(a["created_at"]),
                  "owned_by": "agentd", "agentd": a} for a in agents]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        agent, fields = oc.chat_request(body, self.daemon.engine.model_id)
        if agent is not None:
            await self._ensure_agent(request, agent, fields.get("system"))
            req = await self._build(p.Turn, **fields)
        else:
            req = await self._build(p.Complete, **fields)
        model = body["model"]
        if not body.get("stream"):
            return web.json_response(oc.chat_completion(model, await self._call(request, req)))
        chunks = oc.ChatChunks(model, bool((body.get("stream_options") or {}).get("include_usage")))
        resp = await self._start_sse(request)
        await resp.write(oc.sse(chunks.first()))

        async def on_frame(frame: dict) -> None:
            if frame["type"] == "token":
                await resp.write(oc.sse(chunks.text(frame["text"])))

        try:
            result = await self._call(request, req, on_frame)
            for chunk in chunks.last(result):
                await resp.write(oc.sse(chunk))
        except oc.ApiError as e:
            await resp.write(oc.sse(e.body()))  # the OpenAI clients raise on an error event
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _start_sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def create_response(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        spec = oc.response_request(body, self.daemon.engine.model_id)
        created = time.time()
        ref = {"id": spec["response_id"], "meta": {**spec["meta"], "created_at": created}} if spec["store"] else None
        req = await self._response_turn(request, spec, ref)
        if not body.get("stream"):
            result = await self._call(request, req)
            return web.json_response(oc.response_object(spec["response_id"], created, spec["meta"], result))
        return await self._stream_response(request, req, spec, created)

    async def _response_turn(self, request: web.Request, spec: dict, ref: dict | None) -> p.Request:
        """The protocol request of a Responses call: append to the agent, or follow the
        transcript as of `previous_response_id` (keeping a branch if it moved on since)."""
        sampling, agent, messages, system = spec["sampling"], spec["agent"], spec["messages"], spec["system"]
        previous = None
        if spec["previous"] is not None:
            previous = await self._call(request, p.GetResponse(spec["previous"]))
            if agent is not None and previous["agent"] not in (None, agent):
                raise oc.bad(f"previous_response_id belongs to agent {previous['agent']!r}, not {agent!r}",
                             "previous_response_id")
            agent = agent or previous["agent"]
        common = {"tools": spec["tools"], "response": ref, **sampling}
        if agent is None:
            if previous is not None:  # a stateless chain: the stored conversation goes first
                body = previous["body"]
                messages = body["messages"] + messages
                system = body["system"] if system is None else system
            return await self._build(p.Complete, messages=messages, system=system or "", **common)
        await self._ensure_agent(request, agent, system)
        current = (await self._call(request, p.Show(agent)))["system"]
        if previous is None and (system is None or system == current):
            return await self._build(p.Turn, name=agent, messages=messages, **common)
        history = (await self._call(request, p.History(agent)))["messages"]
        kept = history if previous is None else history[: previous["n_messages"]]
        return await self._build(p.Turn, name=agent, messages=kept + messages, follow=True, system=system, **common)

    async def _stream_response(self, request, req, spec, created) -> web.StreamResponse:
        rid, meta = spec["response_id"], spec["meta"]
        resp = await self._start_sse(request)
        seq = itertools.count()
        item_id = "msg_" + rid.removeprefix("resp_")

        async def send(kind: str, **fields) -> None:
            await resp.write(oc.sse({"type": kind, "sequence_number": next(seq), **fields}, kind))

        shell = oc.response_object(rid, created, meta, None, status="in_progress")
        await send("response.created", response=shell)
        await send("response.in_progress", response=shell)
        await send("response.output_item.added", output_index=0,
                   item={"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []})
        await send("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": []})

        async def on_frame(frame: dict) -> None:
            if frame["type"] == "token":
                await send("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                           delta=frame["text"], logprobs=[])

        try:
            result = await self._call(request, req, on_frame)
        except oc.ApiError as e:
            await send("error", code=e.code, message=e.message, param=e.param)
            return resp
        final = oc.response_object(rid, created, meta, result)
        await send("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
                   text=result["text"], logprobs=[])
        await send("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                   part={"type": "output_text", "text": result["text"], "annotations": []})
        for index, item in enumerate(final["output"]):
            if item["type"] == "message":
                await send("response.output_item.done", output_index=index, item=item)
            else:
                await send("response.output_item.added", output_index=index, item=item)
                await send("response.output_item.done", output_index=index, item=item)
        await send("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
        return resp

    async def get_response(self, request: web.Request) -> web.Response:
        row = await self._call(request, p.GetResponse(request.match_info["response_id"]))
        body = row["body"]
        return web.json_response(oc.response_object(row["response_id"], row["created_at"], body["meta"],
                                                    body["result"]))

    # ---- the status page --------------------------------------------------------------

    async def export_agent(self, request: web.Request) -> web.StreamResponse:
        """The agent's bundle (`agentctl export`) as the body, streamed as the export op
        produces it. Errors found before the first byte are JSON errors; the bundle's own
        checksum covers the rest (an import refuses a cut-off body)."""
        name = request.match_info["name"]
        req = await self._build(p.Export, name=name)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Content-Disposition": f'attachment; filename="{name}.agent"'})

        async def on_frame(frame: dict) -> None:
            if frame.get("type") == "chunk":
                if not response.prepared:
                    await response.prepare(request)
                await response.write(frame["data"])

        try:
            await self._call(request, req, on_frame)
        except oc.ApiError:
            if response.prepared:
                raise ConnectionResetError("the export failed after its first bytes") from None
            raise
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
        return response

    async def import_agent(self, request: web.Request) -> web.Response:
        """Recreate an agent from a bundle sent as the body (`?name=NEW` renames it): the
        import op's upload, fed from the body as it arrives. Answers the import's result."""
        req = await self._build(p.Import, name=request.query.get("name"))
        rid = next(self._ids)

        async def receive() -> dict:
            # Straight from the stream: the body may be far larger than client_max_size.
            return {"id": rid, "op": "chunk", "data": await request.content.read(p.MAX_CHUNK_BYTES)}

        async def emit(frame: dict | None) -> None:
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the HTTP client went away")

        reply = await self.daemon.handle(rid, req, emit, receive)
        if reply["type"] == "error":
            raise oc.api_error(reply["code"], reply["message"])
        return web.json_response({k: v for k, v in reply.items() if k not in ("id", "type")})

    async def login(self, request: web.Request) -> web.Response:
        """`/login?key=...` (what `agentctl open` opens): a cookie for the status page,
        then a redirect, so the key leaves the address bar at once."""
        if not self._key_ok(request.query.get("key")):
            return web.Response(text=render_login_needed(), content_type="text/html", status=401)
        resp = web.Response(status=303, headers={"Location": "/"})
        resp.set_cookie(COOKIE, self._page_cookie(), httponly=True, samesite="Strict", path="/")
        return resp

    async def status_page(self, request: web.Request) -> web.Response:
        status = await self._call(request, p.Status())
        return web.Response(text=render_status_page(status), content_type="text/html",
                            headers={"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'none'; "
                                     "style-src 'unsafe-inline'"})
