"""The `export` and `import` ops on the wire: bundle bytes in chunk frames, either way.

Export streams the bundle the worker built as `chunk` frames, then the result. Import is
an upload: the client's `chunk` requests (the import's id; an empty one ends it) are fed
to a `BundleReader` off the event loop as they arrive, so a refusal is known early; the
rest of the upload is still read (and dropped) so the connection stays in step, and the
one error is the answer. Only a whole, verified bundle reaches the worker.
"""

from __future__ import annotations

import asyncio

from . import protocol as p
from . import responses
from .bundle import BundleError, BundleReader
from .portable import export_agent, import_agent


async def export_op(daemon, req: p.Export, rid: int, emit) -> dict:
    daemon.store.records.get(req.name, with_messages=False)  # NOT_FOUND before any work

    def job():
        try:
            return export_agent(daemon.store, req.name)
        finally:
            daemon.memory.enforce(daemon.store)  # export makes the agent hot, as a chat does

    exported = await daemon._mlx(job, agent=req.name)  # after a turn in flight for it
    built = exported.built
    for piece in built.pieces:
        for lo in range(0, piece.nbytes, p.MAX_CHUNK_BYTES):
            await emit(responses.chunk(rid, piece[lo:lo + p.MAX_CHUNK_BYTES]))
    return {"name": req.name, "bytes": built.size, "sha256": built.sha256, "messages": exported.messages,
            "cache_tokens": exported.cache_tokens, "cache_reason": exported.cache_reason}


async def _next_chunk(rid: int, receive, emit) -> bytes:
    """The next piece of the upload; anything but a chunk of this import breaks the
    connection (its next frames could not be told apart from requests)."""
    if receive is None:
        raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, "import needs an upload on the same connection")
    wire = await receive()
    try:
        crid, chunk = p.request_from_wire(wire)
        if not isinstance(chunk, p.Chunk) or crid != rid:
            raise p.ProtocolError(p.ErrorCode.BAD_REQUEST,
                                  f"expected the import's chunks (id {rid}) then an empty chunk, got {chunk.op}")
    except p.ProtocolError as e:
        await emit(responses.error(rid, e.code, e.message))
        raise ConnectionResetError("the upload broke off") from None
    return chunk.data


async def drain_upload(rid: int, receive, emit, limit: int | None = None) -> None:
    """Read the rest of an upload whose answer is already known."""
    limit = limit if limit is not None else BundleReader().max_bytes
    seen = 0
    while data := await _next_chunk(rid, receive, emit):
        seen += len(data)
        if seen > limit:
            await emit(responses.error(rid, p.ErrorCode.BAD_BUNDLE, f"the upload exceeds the limit of {limit} bytes"))
            raise ConnectionResetError("oversized upload")


async def import_op(daemon, req: p.Import, rid: int, emit, receive) -> dict:
    reader = BundleReader()
    refusal: Exception | None = None
    if req.name is not None and daemon.store.records.name_taken(req.name):
        refusal = p.ProtocolError(p.ErrorCode.ALREADY_EXISTS, f"agent {req.name!r} already exists")
    while refusal is None:
        data = await _next_chunk(rid, receive, emit)
        if not data:
            break
        try:
            # Off the event loop: hashing a 4 MiB chunk takes milliseconds.
            await asyncio.to_thread(reader.feed, data)
        except BundleError as e:
            refusal = e
    if refusal is not None:
        await drain_upload(rid, receive, emit)
        raise refusal
    bundle = await asyncio.to_thread(reader.finish)
    imported = await daemon._mlx(import_agent, daemon.store, bundle, req.name)
    return {"agent": daemon._info(imported.name), "bytes": bundle.size, "sha256": bundle.sha256,
            "cache_imported": imported.cache_tokens > 0, "cache_tokens": imported.cache_tokens,
            "cache_reason": imported.cache_reason}
