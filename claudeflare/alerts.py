"""Alerts: a JSON POST to a webhook when an account breaks, so a team lead hears of it.

`[alerts]` in accounts.toml (reloaded with it) says where (`url`), how (`format`: generic or slack)
and which `events`. `detect` is a pure function over two successive snapshots of the accounts'
effective states (the proxy's status rows, every second), so an event fires once per occurrence,
not once per request. A `Sender` thread posts them, with retries, off the event loop.

Client keys' budgets: whoever tracks spend sets `Alerts.budgets` to a function returning each
budgeted client's `BudgetView` (its period, spend and budget) now; `budget_events` then sends
budget-80 and budget-100 once per period. Other addons may raise an event directly with
`Alerts.notify(event, account=None, client=None, message=…, **fields)`, which never blocks and
returns whether the alert was queued.

Webhook URLs are secrets (Slack's carry their key in the path): only the host is ever logged or
shown. Payloads are built from names and states; anything shaped like a key or token is masked.
"""

import asyncio
import base64
import contextlib
import http.client
import json
import logging
import queue
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .clock import iso_utc

logger = logging.getLogger(__name__)

EVENTS = ("needs-login", "disabled", "limited", "exhausted", "refresh-failing", "budget-80", "budget-100")
FORMATS = ("generic", "slack")
ALERT_KEYS = {"url", "format", "events"}
BROKEN_STATES = ("needs-login", "disabled", "limited")  # an account entering one of these is an event
SERVING_STATES = {"ok", "warning", "overloaded"}  # overloaded: a 529 benches for seconds, Anthropic-wide
REFRESH_FAILURES = 3  # consecutive failed refreshes (30 s, then 60 s apart) before "refresh-failing"
MAX_URL = 2048
SECRET_SHAPE = re.compile(r"\b(?:sk-ant-|cfk-)[A-Za-z0-9_-]+")  # Anthropic's keys and tokens, client keys


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertsConfig:
    url: str = field(repr=False)  # a secret: never in a log line, an error or a repr
    format: str = "generic"
    events: frozenset[str] = frozenset(EVENTS)

    @property
    def host(self) -> str:
        """What may be shown of the URL."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def parse_alerts(table) -> AlertsConfig:
    """The `[alerts]` table; ValueError with a message that never quotes the URL."""
    if not isinstance(table, dict):
        raise ValueError("'alerts' must be a table: [alerts]")
    unknown = set(table) - ALERT_KEYS
    if unknown:
        raise ValueError(
            f"[alerts]: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(ALERT_KEYS))}"
        )
    url = table.get("url")
    check_url(url)
    fmt = table.get("format", "generic")
    if fmt not in FORMATS:
        raise ValueError(f"[alerts]: 'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    events = table.get("events", list(EVENTS))
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        raise ValueError("[alerts]: 'events' must be a list of event names")
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise ValueError(f"[alerts]: unknown event(s) {', '.join(map(repr, unknown))}; known: {', '.join(EVENTS)}")
    return AlertsConfig(url, fmt, frozenset(events))


def check_url(url) -> None:
    if not isinstance(url, str):
        raise ValueError("[alerts]: 'url' is required: the http(s) URL to POST alerts to")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or len(url) > MAX_URL
        or not (url.isascii() and url.isprintable())
        or " " in url
    ):
        raise ValueError(
            f"[alerts]: 'url' must be an http:// or https:// URL with a host (at most {MAX_URL} printable ASCII characters, no spaces)"
        )


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountView:
    """What alerts need of one account's status row."""

    state: str
    limited_until: str | None = None
    refresh_failures: int = 0


@dataclass(frozen=True)
class Event:
    event: str
    message: str
    account: str | None = None
    fields: dict = field(default_factory=dict)


def snapshot(rows: Iterable[Mapping], refresh_failures: Mapping[str, int]) -> dict[str, AccountView]:
    """From the proxy's status rows and the refresher's consecutive failures per account."""
    return {
        r["name"]: AccountView(r["state"], r.get("limited_until"), refresh_failures.get(r["name"], 0)) for r in rows
    }


def exhausted(accounts: Mapping[str, AccountView]) -> bool:
    """No account could take a new request (an empty pool has nothing to break)."""
    return bool(accounts) and not any(a.state in SERVING_STATES for a in accounts.values())


def detect(before: Mapping[str, AccountView], after: Mapping[str, AccountView]) -> list[Event]:
    """The events between two snapshots: an account entering a broken state, refreshes reaching
    REFRESH_FAILURES in a row, the pool becoming exhausted. A state that lasts fires nothing more."""
    events = []
    for name, now in after.items():
        was = before.get(name)
        if now.state in BROKEN_STATES and (was is None or was.state != now.state):
            events.append(account_event(name, now))
        if now.refresh_failures >= REFRESH_FAILURES > (was.refresh_failures if was else 0):
            events.append(
                Event(
                    "refresh-failing",
                    f"Claudeflare: refreshing the token of account {name} failed {now.refresh_failures} times in a row; "
                    "it serves while its current token lasts (`claudeflare list` says why).",
                    name,
                    {"failures": now.refresh_failures},
                )
            )
    if exhausted(after) and not exhausted(before):
        resets = sorted(a.limited_until for a in after.values() if a.limited_until)
        states = ", ".join(f"{n}: {a.state}" for n, a in sorted(after.items()))
        back = f"; the first is back at {resets[0]}" if resets else ""
        events.append(
            Event(
                "exhausted",
                f"Claudeflare: no account can take a new request ({states}){back}.",
                None,
                {"reset": resets[0] if resets else None, "accounts": {n: a.state for n, a in after.items()}},
            )
        )
    return events


def account_event(name: str, view: AccountView) -> Event:
    if view.state == "needs-login":
        return Event(
            "needs-login", f"Claudeflare: account {name} needs a new log-in: run `claudeflare login {name}`.", name
        )
    if view.state == "disabled":
        return Event(
            "disabled",
            f"Claudeflare: Anthropic disabled account {name}; it serves nothing until its credential changes.",
            name,
        )
    until = f"until {view.limited_until}" if view.limited_until else "for now"
    return Event(
        "limited", f"Claudeflare: account {name} is rate limited {until}.", name, {"reset": view.limited_until}
    )


@dataclass(frozen=True)
class BudgetView:
    """A client key's spend in its current budget period."""

    period_start: str
    spent_usd: float
    budget_usd: float

    @property
    def share(self) -> float:
        return self.spent_usd / self.budget_usd if self.budget_usd > 0 else 0.0  # no budget, nothing to pass


BUDGET_SHARES = ((0.8, "budget-80"), (1.0, "budget-100"))


def budget_events(before: Mapping[str, BudgetView], after: Mapping[str, BudgetView]) -> list[Event]:
    """A client's spend passing 80 % and 100 % of its budget: once each per period."""
    events = []
    for client, now in after.items():
        was = before.get(client)
        earlier = was.share if was and was.period_start == now.period_start else 0.0
        share = now.share
        for threshold, event in BUDGET_SHARES:
            if share >= threshold > earlier:
                over = "; its requests are refused until the period ends" if threshold >= 1 else ""
                events.append(
                    Event(
                        event,
                        f"Claudeflare: client key {client} has spent ${now.spent_usd:.2f} of its ${now.budget_usd:.2f} budget "
                        f"({share:.0%}) in the period since {now.period_start}{over}.",
                        None,
                        {
                            "client": client,
                            "spent_usd": now.spent_usd,
                            "budget_usd": now.budget_usd,
                            "period_start": now.period_start,
                        },
                    )
                )
    return events


SAMPLES = {
    "needs-login": AccountView("needs-login"),
    "disabled": AccountView("disabled"),
    "limited": AccountView("limited", "2030-01-01T00:00:00.000Z"),
}


def sample(event: str) -> Event:
    """A made-up event of this kind, for `claudeflare alerts test`."""
    if event in SAMPLES:
        return account_event("sample-account", SAMPLES[event])
    if event == "exhausted":
        return detect({}, {"sample-account": SAMPLES["limited"]})[-1]
    if event == "refresh-failing":
        return detect({}, {"sample-account": AccountView("ok", refresh_failures=REFRESH_FAILURES)})[0]
    spent = {"budget-80": 8.0, "budget-100": 10.0}[event]
    return budget_events({}, {"sample-client": BudgetView("2030-01-01T00:00:00.000Z", spent, 10.0)})[-1]


# --- payloads and posting ------------------------------------------------------------------------


def mask(value):
    return SECRET_SHAPE.sub("[redacted]", value) if isinstance(value, str) else value


def payload(
    config: AlertsConfig,
    event: str,
    message: str,
    account: str | None = None,
    client: str | None = None,
    at: float | None = None,
    **fields,
) -> dict:
    """The JSON body: generic `{event, account, message, at, …}` or Slack's `{text}`."""
    message = mask(message)
    if config.format == "slack":
        return {"text": message}
    body = {"event": event, "account": account, "message": message, "at": iso_utc(time.time() if at is None else at)}
    if client is not None:
        body["client"] = client
    return body | {k: mask(v) for k, v in fields.items() if k not in body}


def post(config: AlertsConfig, body: dict, timeout: float = 5.0) -> int:
    """POST `body` as JSON; the reply's status. http.client, because it logs nothing (the URL is a
    secret); no redirects followed, no reply body read. OSError / HTTPException on failure."""
    parts = urlsplit(config.url)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json", "User-Agent": "claudeflare-alerts"}
    if parts.username is not None:
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
    try:
        conn.request(
            "POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), json.dumps(body).encode(), headers
        )
        return conn.getresponse().status
    finally:
        conn.close()


def failure(error: Exception) -> str:
    """Why a post failed, without the URL (some exceptions quote it)."""
    return getattr(error, "strerror", None) or type(error).__name__


def deliver(config: AlertsConfig, body: dict, post: Callable = post) -> str | None:
    """One try; None when the receiver took it, else why not."""
    try:
        status = post(config, body)
    except (OSError, http.client.HTTPException) as e:
        return failure(e)
    return None if 200 <= status < 300 else f"HTTP {status}"


class Sender:
    """A worker thread posting alerts from a bounded queue, a few tries each with backoff."""

    def __init__(self, size: int = 100, tries: int = 3, delay: float = 1.0, post: Callable = post):
        self.tries, self.delay, self.post = tries, delay, post
        self._queue: queue.Queue = queue.Queue(size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropping = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="claudeflare-alerts", daemon=True)
        self._thread.start()

    def submit(self, config: AlertsConfig, body: dict) -> bool:
        """Queue one alert; never blocks. A full queue drops it, with one log line per run of drops."""
        try:
            self._queue.put_nowait((config, body))
        except queue.Full:
            if not self._dropping:
                logger.warning(
                    "claudeflare: alerts to %s are backing up; dropping %r and further ones until the queue drains",
                    config.host,
                    body.get("event", "alert"),
                )
            self._dropping = True
            return False
        self._dropping = False
        return True

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is None:  # stop(): what was queued before it has had one try each
                return
            try:
                self._send(*item)
            except Exception:  # the thread must outlive any surprise
                logger.exception("claudeflare: sending an alert failed")

    def _send(self, config: AlertsConfig, body: dict) -> None:
        for attempt in range(self.tries):
            why = deliver(config, body, self.post)
            if why is None:
                return
            if why.startswith("HTTP ") and not why.startswith(("HTTP 5", "HTTP 429")):
                break  # the receiver refuses it (or redirects, which a webhook should not): asking again won't help
            if attempt + 1 < self.tries and self._stop.wait(self.delay * 2**attempt):
                break
        logger.warning(
            "claudeflare: alert %r to %s not delivered (%d tries): %s",
            body.get("event", "alert"),
            config.host,
            attempt + 1,
            why,
        )

    def stop(self, timeout: float = 2.0) -> None:
        """Pending alerts get one try each, within `timeout`; retries stop at once."""
        self._stop.set()
        with contextlib.suppress(queue.Full):  # a full queue: the worker sees the flag once it is empty
            self._queue.put_nowait(None)
        if self._thread:
            self._thread.join(timeout)


# --- the addon -----------------------------------------------------------------------------------


class Alerts:
    """Watches the Claudeflare addon's account states each second and posts what changed.

    `[alerts]` comes with the pool, so an edit to accounts.toml applies within a second."""

    def __init__(self, claudeflare, sender: Sender | None = None):
        self.claudeflare = claudeflare
        self.sender = sender or Sender()
        self.seen: dict[str, AccountView] = {}
        self.budgets: Callable[[], Mapping[str, BudgetView]] | None = None  # set by the budget tracking
        self.seen_budgets: Mapping[str, BudgetView] = {}
        self.announced: AlertsConfig | None = None
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        self.sender.start()
        self._task = asyncio.get_running_loop().create_task(self.watch())

    def done(self) -> None:
        if self._task:
            self._task.cancel()
        self.sender.stop()

    @property
    def config(self) -> AlertsConfig | None:
        # The watcher's latest pool, read as is: notify() may be called from any thread.
        watcher = self.claudeflare.watcher
        return watcher.pool.alerts if watcher else None

    async def watch(self, every: float = 1.0) -> None:
        failed = None
        while True:
            try:
                self.check()
                failed = None
            except Exception as e:  # one bad value must not end alerts for good
                if type(e) is not failed:
                    logger.exception("claudeflare: checking for alerts failed")
                failed = type(e)
            await asyncio.sleep(every)

    def check(self) -> None:
        self.announce(self.config)
        refresher = self.claudeflare.refresher
        now = snapshot(self.claudeflare.status_rows(), refresher.failures if refresher else {})
        events, self.seen = detect(self.seen, now), now
        if self.budgets:
            budgets = self.budgets()
            events += budget_events(self.seen_budgets, budgets)
            self.seen_budgets = budgets
        for e in events:
            self.notify(e.event, e.account, message=e.message, **e.fields)

    def announce(self, config: AlertsConfig | None) -> None:
        """One log line when [alerts] changes, naming the host only."""
        if config != self.announced:
            if config:
                logger.info(
                    "claudeflare: alerts go to %s (%s format): %s",
                    config.host,
                    config.format,
                    ", ".join(e for e in EVENTS if e in config.events) or "no events",
                )
            else:
                logger.info("claudeflare: alerts off (no [alerts] in accounts.toml)")
        self.announced = config

    def notify(
        self, event: str, account: str | None = None, client: str | None = None, message: str = "", **fields
    ) -> bool:
        """Queue an alert if `[alerts]` asks for this event; safe from any thread, never blocks."""
        if event not in EVENTS:
            raise ValueError(f"unknown alert event {event!r}")
        config = self.config
        if config is None or event not in config.events:
            return False
        return self.sender.submit(config, payload(config, event, message, account, client, time.time(), **fields))
