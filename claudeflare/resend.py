"""Sending a flow's request again, to another account, when the first answer was a refusal.

mitmproxy sends each flow upstream once; a retry is ours to make. The reply is read whole and
handed back as a mitmproxy Response, because mitmproxy can only stream bodies it fetched itself:
a retried stream therefore reaches the client in one piece (see the README for what that costs).
"""

import logging

import httpx
from mitmproxy import http

logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per retry is noise in mitmproxy's log

# Hop-by-hop and length headers: httpx and mitmproxy set their own.
SKIP_REQUEST = {
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-connection",
    "te",
    "upgrade",
}
SKIP_RESPONSE = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


class ReplyTooLarge(Exception):
    """The reply is over the proxy's body cap: reading stopped there, as mitmproxy's own would."""


class Resender:
    def __init__(self, timeout: float = 600.0):
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=False,
            trust_env=False,  # never route pool traffic through some proxy from the environment
        )

    async def send(self, request: http.Request, headers: http.Headers, max_body: int) -> http.Response:
        """Raises httpx.TransportError when the upstream can't be reached or the reply breaks off, and
        ReplyTooLarge past `max_body` bytes (claudeflare_max_body_mb, mitmproxy's body_size_limit)."""
        url = f"{request.scheme}://{request.host}:{request.port}{request.path}"
        outgoing = [(k, v) for k, v in headers.items(multi=True) if k.lower() not in SKIP_REQUEST]
        upstream = self.client.build_request(request.method, url, headers=outgoing, content=request.raw_content or b"")
        reply = await self.client.send(upstream, stream=True)
        try:
            body = bytearray()
            async for chunk in reply.aiter_raw():  # still encoded, as the client accepts it
                body += chunk
                if len(body) > max_body:
                    raise ReplyTooLarge(f"reply over {max_body} bytes")
        finally:
            await reply.aclose()
        response = http.Response.make(
            reply.status_code,
            b"",
            [(k, v) for k, v in reply.headers.raw if k.lower() not in SKIP_RESPONSE],
        )
        response.raw_content = bytes(body)
        response.headers["content-length"] = str(len(body))
        return response

    async def close(self) -> None:
        await self.client.aclose()
