"""Datasette plugin: the dashboard's login, safe to face anonymous visitors.

datasette-auth-passwords hashes a password (PBKDF2, 480,000 rounds: a third of a second of CPU) on
the event loop for anyone, without limit: at `/-/login`, at `/-/password-tool`, and for any request
carrying `Authorization: Basic`. So this plugin, whose routes come first:
- answers `/-/login` itself: the form as before, but each client address gets `LOGIN_ATTEMPTS`
  password checks per `LOGIN_WINDOW` seconds (429 after), and checks run in a worker thread, at
  most `HASHING_AT_ONCE` at a time;
- turns `/-/password-tool` off (`claudeflare dashboard-password` sets the password);
- drops `Authorization: Basic` headers, as the dashboard does not use HTTP basic auth;
- caps request bodies at `MAX_BODY` (Datasette reads a form whole, before knowing who sent it).
"""

import asyncio
import time
import weakref
from collections import deque

from datasette import hookimpl
from datasette.utils.asgi import Response
from datasette_auth_passwords import password_login
from datasette_auth_passwords.utils import verify_password

LOGIN_ATTEMPTS, LOGIN_WINDOW = 5, 60.0
HASHING_AT_ONCE = 2
MAX_CLIENTS = 10_000  # addresses remembered at once: the limiter's own memory is bounded too
MAX_BODY = 64 * 1024  # the dashboard's forms (login, management) are a few hundred bytes


class RateLimiter:
    """At most `attempts` per `window` seconds per key."""

    def __init__(self, attempts: int, window: float, max_keys: int = MAX_CLIENTS):
        self.attempts, self.window, self.max_keys = attempts, window, max_keys
        self.seen: dict[str, deque[float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if key not in self.seen and len(self.seen) >= self.max_keys:
            self.seen = {k: q for k, q in self.seen.items() if q and q[-1] > now - self.window}
            if len(self.seen) >= self.max_keys:
                return False  # a flood from many addresses: refuse newcomers until it passes
        times = self.seen.setdefault(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.attempts:
            return False
        times.append(now)
        return True


class Guard:
    """Per Datasette instance: the attempts seen and the hashing slots."""

    def __init__(self) -> None:
        self.attempts = RateLimiter(LOGIN_ATTEMPTS, LOGIN_WINDOW)
        self.hashing = asyncio.Semaphore(HASHING_AT_ONCE)

    async def password_matches(self, password: str, password_hash: str | None) -> bool:
        if not password_hash:
            return False
        async with self.hashing:
            return await asyncio.to_thread(verify_password, password, password_hash)


guards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def client_address(request) -> str:
    client = request.scope.get("client")
    return client[0] if client else "unknown"


async def login_form(datasette, request, error: str | None, status: int = 200) -> Response:
    return Response.html(
        await datasette.render_template("password_login.html", {"error": error}, request=request), status=status
    )


async def login(request, datasette):
    if request.method != "POST":
        return await password_login(request, datasette)  # the form: nothing is hashed
    guard = guards.setdefault(datasette, Guard())
    if not guard.attempts.allow(client_address(request)):
        return await login_form(datasette, request, "Too many attempts: wait a minute and try again.", status=429)
    config = datasette.plugin_config("datasette-auth-passwords") or {}
    accounts = {k.removesuffix("_password_hash"): v for k, v in config.items() if k.endswith("_password_hash")}
    post_vars = await request.post_vars()
    username, password = post_vars.get("username") or "", post_vars.get("password") or ""
    if not await guard.password_matches(password, accounts.get(username)):
        return await login_form(datasette, request, "Invalid username or password")
    actor = (config.get("actors") or {}).get(username) or {"id": username}
    response = Response.redirect(datasette.urls.path("/"))
    response.set_cookie("ds_actor", datasette.sign({"a": actor}, "actor"))
    return response


async def password_tool(request, datasette):
    return Response.text("Off: set the dashboard password with `claudeflare dashboard-password`.", status=404)


@hookimpl(tryfirst=True)  # before datasette-auth-passwords' routes of the same paths
def register_routes(datasette):
    return [(r"^/-/login$", login), (r"^/-/password-tool$", password_tool)]


@hookimpl
def asgi_wrapper(datasette):
    def wrap(app):
        async def guarded(scope, receive, send):
            if scope.get("type") != "http":
                return await app(scope, receive, send)
            headers = [
                (k, v)
                for k, v in scope.get("headers", [])
                if not (k.lower() == b"authorization" and v[:6].lower() == b"basic ")
            ]
            length = dict(headers).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > MAX_BODY:
                return await Response.text(f"Request body over {MAX_BODY} bytes", status=413).asgi_send(send)
            await app({**scope, "headers": headers}, capped(receive), send)

        return guarded

    return wrap


def capped(receive):
    """`receive` that ends a body sent without Content-Length (chunked) once past MAX_BODY."""
    seen = 0

    async def limited():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                return {"type": "http.disconnect"}
        return message

    return limited
