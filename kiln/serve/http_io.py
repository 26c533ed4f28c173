"""Reading request bodies with a size bound, the API key check, and running a handler until the client leaves."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, AsyncIterator, Awaitable

from starlette.requests import ClientDisconnect, Request

from kiln.serve.errors import APIError, bad_request


DRAIN_LIMIT = 64 * 2**20  # an over-large body is read and dropped up to this, so the client can read the 413


async def read_json(request: Request, limit: int) -> Any:
    """The decoded JSON body; 413 past `limit` bytes (the rest is dropped unkept), 400 for bytes that are not JSON."""
    chunks, size = [], 0
    stream = request.stream()
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                await _drain(stream, size, max(DRAIN_LIMIT, limit))
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending its request") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}") from None


async def _drain(stream: AsyncIterator[bytes], size: int, cap: int) -> None:
    """Read the rest of a refused body without keeping it (a client still sending would see a reset instead of the
    answer); a body past `cap` is cut off."""
    async for chunk in stream:
        size += len(chunk)
        if size > cap:
            return


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes (kiln serve "
                         "--max_request_bytes)")


def check_api_key(request: Request, key: str | None) -> None:
    """`Authorization: Bearer <key>` when the server has a key (compared in constant time)."""
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
                            "kiln serve was started with (--api_key)", code="invalid_api_key")


async def wait_disconnect(request: Request) -> None:
    """Returns when the client closes its connection (the body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client disconnects first, cancel it (its clean-up aborts the generation) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None
