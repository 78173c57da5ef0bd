"""Reading big request bodies without stalling mitmproxy's event loop.

A body of a few hundred KiB parses in milliseconds; a 31 MB one took the loop ~1 s (four at once,
3.5 s), and every other client waited. Bodies over LOOP_PARSE_LIMIT are parsed in a worker thread
— and "yielding": json's C parser and encoder hold the GIL for their whole run, which would stall
the loop from the thread just the same, so the thread builds each object through a Python hook and
encodes with the pure-Python encoder, letting the loop run between objects. Same results, slower.
"""

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor

LOOP_PARSE_LIMIT = 256 * 1024  # Claude Code's bodies are 75–120 KB and carry its session header
# One thread: the loop then shares the GIL with one parser, not with one per big body in flight.
_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claudeflare-parse")


def _dict(pairs: list) -> dict:
    return dict(pairs)  # a Python frame per object: the GIL can pass to the loop in between


def loads(data: bytes, yielding: bool = False):
    return json.loads(data, object_pairs_hook=_dict) if yielding else json.loads(data)


async def off_loop(parse, *args, body: bytes | None, always: bool = False):
    """`parse(*args, body)` on the loop for a small body; in a worker thread, yielding, for a big one
    (or for any, `always`: a compressed body is small until it is decoded)."""
    if body is None or (len(body) <= LOOP_PARSE_LIMIT and not always):
        return parse(*args, body)
    return await asyncio.get_running_loop().run_in_executor(
        _PARSER, functools.partial(parse, *args, body, yielding=True)
    )
