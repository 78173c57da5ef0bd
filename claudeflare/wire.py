"""An account's credential goes on the wire only: the flow's request holds a placeholder.

Everything else sees the flow: mitmweb lists it while it is in flight, `-w` saves it, `flow_detail`
prints it, any other addon may read it. So the request keeps `x-api-key: [claudeflare: NAME]` or
`authorization: Bearer [claudeflare: NAME]`, and the real value is kept here, keyed by that very
Request object — which only our addon registers, so nothing a client sends can make us substitute
a secret into a header of its choosing or into a flow that is not the pool's. It is swapped into a
copy of the request just as mitmproxy serialises the head for the upstream.

Patched in mitmproxy 12.3 (`proxy/layers/http`): an HTTP/1 upstream gets the head from
`Http1Client.send` (which, for HTTP/2 and HTTP/3 clients, converts a copy of the request first,
so the swap happens before that copy); HTTP/2 and HTTP/3 upstreams get it from
`format_h2_request_headers`, which `_http2` and `_http3` each import by name. A request nobody
registered (a replay, a copy) goes out with its placeholder, which Anthropic refuses: fail closed.
"""

import copy
import dataclasses
import weakref

from mitmproxy import http
from mitmproxy.proxy.layers.http import RequestHeaders, _http1, _http2, _http3

PLACEHOLDERS = {
    "authorization": "Bearer [claudeflare: {}]",
    "x-api-key": "[claudeflare: {}]",
    "x-amz-security-token": "[claudeflare: {}]",
}  # a Bedrock account's AWS session token

# header name -> (placeholder, secret) for each request we sent with a credential
_held: weakref.WeakKeyDictionary[http.Request, dict[str, tuple[str, str]]] = weakref.WeakKeyDictionary()


def conceal(request: http.Request, headers: http.Headers, account: str) -> None:
    """Give `request` the headers `headers`, each credential in them as a placeholder naming `account`."""
    shown = headers.copy()
    held = {}
    for name, template in PLACEHOLDERS.items():
        secret = shown.get(name)
        if secret is not None:
            shown[name] = mark = template.format(account)
            held[name] = (mark, secret)
    request.headers = shown
    _held[request] = held


def on_wire(request: http.Request) -> http.Request:
    """The request as the upstream must get it: a copy with the credentials, or itself if it has none.
    A placeholder something else has changed since is left as it is."""
    held = _held.get(request)
    if not held:
        return request
    # Shares all but the headers with the flow's request: a full copy re-checks every field (~25 µs).
    wire = copy.copy(request)
    wire.data = copy.copy(request.data)
    wire.data.headers = request.headers.copy()
    for name, (mark, secret) in held.items():
        if wire.headers.get(name) == mark:
            wire.headers[name] = secret
    return wire


def _with_credentials(event):
    if isinstance(event, RequestHeaders) and (wire := on_wire(event.request)) is not event.request:
        return dataclasses.replace(event, request=wire)
    return event


_http1_send = _http1.Http1Client.send
_format_h2_request_headers = _http2.format_h2_request_headers


def _send_http1(self, event):
    return (yield from _http1_send(self, _with_credentials(event)))


def _format_h2(context, event):
    return (yield from _format_h2_request_headers(context, _with_credentials(event)))


def install() -> None:
    _http1.Http1Client.send = _send_http1
    _http2.format_h2_request_headers = _http3.format_h2_request_headers = _format_h2
