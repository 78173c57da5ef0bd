"""One pool across workers and instances (issue #14): the state that makes several proxies one pool.

The hot path never waits on the shared store. Each proxy keeps routing from its own in-memory copy
(Balancer, Health) as before; what it learns that others must know — a conversation bound to an
account, an account benched until its reset — is published write-behind as an `Event`, and a
background thread merges everyone's events into the local copy (`apply` on the proxy's loop).

Two backends, one interface (`SharedState`):
- `HomeState`, the default: `state.db` (SQLite, WAL) in the home folder, for workers on one machine.
  Token refreshes are already single-flight through the credential store's file lock.
- `RedisState` (`claudeflare_state=redis://…` or `rediss://…`): a stream of events, and the OAuth
  credentials in a hash, so a token one instance rotates is the one every instance uses; a refresh
  holds a Redis lock (a random token and an expiry, released only by its holder).

When the store is unreachable, the copy keeps serving; the error is logged once, the thread retries
with backoff, and on reconnect it republishes every live event it knows and reads what it missed.
"""

import asyncio
import contextlib
import json
import logging
import math
import queue
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from .accounts import NAME_RE
from .credentials import Credential, CredentialStore, CredentialStoreError, entry_problem
from .wal import enable_wal

logger = logging.getLogger(__name__)

STATE_FILE = "state.db"
POLL = 0.2  # seconds between reads of the shared store
MAX_BACKOFF = 5.0  # seconds between tries while the store is unreachable
MAX_KEY = 256  # a conversation key is a short id or a hash (conversation.py)
MAX_KNOWN = 50_000  # live events kept for republishing, the oldest go first (as many as bindings kept)
MAX_READ = 1000  # events read per round
LOCK_TTL_MS = 60_000  # a refresh lock outlives any token request (oauth.py times out sooner)
LOCK_WAIT = 30.0
OWNER_DAYS = 30
LOAD_EVERY, LOAD_TTL = 1.0, 3.0  # seconds


@dataclass(frozen=True)
class Event:
    """`bind`: conversation `key` is on `account` until `until`. `bench`: `account` (for model
    `family` only, if set) takes no traffic until `until`. `usage`: what `account`'s usage endpoint
    said (`data`: windows and extra, as Health.observe_usage takes them). `owner`: resource `key`
    (a file or batch) is `account`'s; `unowned`: it is gone. `load`: a proxy (`key`: its origin and
    the account) has `data["n"]` requests in flight on `account`; `client`: the same for client key
    `account`, with `data["admitted"]` requests admitted in UTC minute `data["minute"]`. Times are
    epoch seconds."""

    kind: str
    key: str
    account: str
    until: float
    family: str | None = None
    reason: str | None = None
    data: dict | None = None
    by: str | None = None  # the publishing proxy's origin: it skips its own events when reading back

    @property
    def slot(self) -> tuple[str, str]:
        """A newer event for the same slot replaces an older one."""
        return self.kind, self.key

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, text) -> "Event | None":
        """From the shared store, which anyone with access may have written to: checked, else None."""
        try:
            data = json.loads(text)
            event = cls(**data)
        except (ValueError, TypeError, RecursionError):
            return None
        ok = (
            event.kind in KINDS
            and isinstance(event.key, str)
            and 0 < len(event.key) <= MAX_KEY
            and isinstance(event.account, str)
            and (NAME_RE.fullmatch(event.account) or (event.kind == "unowned" and not event.account))
            and isinstance(event.until, (int, float))
            and not isinstance(event.until, bool)
            and math.isfinite(event.until)
            and (event.family is None or (isinstance(event.family, str) and len(event.family) <= 32))
            and (event.reason is None or (isinstance(event.reason, str) and len(event.reason) <= 200))
            and DATA_CHECKS.get(event.kind, lambda data: data is None)(event.data)
            and (event.by is None or (isinstance(event.by, str) and len(event.by) <= 64))
        )
        return event if ok else None

    def usage(self) -> tuple[dict[str, tuple[float, float | None]], float | None]:
        """A checked `usage` event's (windows, extra)."""
        return usage_data(self.data)  # type: ignore[return-value]


KINDS = ("bind", "bench", "usage", "owner", "unowned", "load", "client")
WINDOW_NAME = re.compile(r"[a-z0-9_]{1,16}")


def usage_data(data) -> tuple[dict[str, tuple[float, float | None]], float | None] | None:
    """`{"windows": {name: [fraction, reset or null]}, "extra": fraction or null}`, checked."""

    def number(x, none_ok=False):
        return (x is None and none_ok) or (
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
        )

    if not isinstance(data, dict) or not isinstance(windows := data.get("windows"), dict) or len(windows) > 8:
        return None
    checked = {}
    for name, value in windows.items():
        if not (
            WINDOW_NAME.fullmatch(name)
            and isinstance(value, list)
            and len(value) == 2
            and number(value[0])
            and number(value[1], none_ok=True)
        ):
            return None
        checked[name] = (float(value[0]), value[1])
    extra = data.get("extra")
    return (checked, extra) if number(extra, none_ok=True) else None


def _counts(*names: str) -> Callable[[object], bool]:
    def check(data) -> bool:
        return (
            isinstance(data, dict)
            and set(data) == set(names)
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 10**9 for n in data.values())
        )

    return check


DATA_CHECKS = {
    "usage": lambda data: usage_data(data) is not None,
    "load": _counts("n"),
    "client": _counts("n", "minute", "admitted"),
}


def parse_state(value: str) -> str:
    """The option claudeflare_state: "home" (the default) or a redis:// / rediss:// URL."""
    value = value.strip()
    if value in ("", "home"):
        return "home"
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (a port that is no number raises)
        fine = parts.scheme in ("redis", "rediss") and bool(parts.hostname)
    except ValueError:
        fine = False
    if not fine:
        # Never echo the value: it may hold a password.
        raise ValueError(
            "claudeflare_state must be 'home' or a redis://[:password@]host:port/db URL (rediss:// for TLS)"
        )
    return value


def where(url: str) -> str:
    """The URL without its password, for log lines."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def open_state(option: str, home: Path) -> "SharedState":
    return HomeState(home) if option == "home" else RedisState(option, home)


class SharedState:
    """The thread that publishes this proxy's events and merges everyone's (see the module's doc).

    Subclasses implement `write`, `read_new`, and optionally `resync` and the credential methods."""

    name = "shared state"

    def __init__(self, home: Path) -> None:
        self.home = home
        self.apply: Callable[[list[Event]], None] = lambda events: None  # called on this thread
        self._outbox: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._known: dict[tuple[str, str], Event] = {}  # live events, ours and others', to republish
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.down: str | None = None  # why the store is unreachable, while it is
        self._next_sweep = 0.0  # of expired events out of _known, once it is full
        self.origin = f"proxy-{secrets.token_hex(8)}/"  # the key prefix of this proxy's own `load` events

    # --- on the proxy's loop: never blocks --------------------------------------------------------

    def publish(self, event: Event) -> None:
        self._outbox.put(event)

    def start(self, apply: Callable[[list[Event]], None]) -> None:
        self.apply = apply
        self._thread = threading.Thread(target=self._run, name="claudeflare-state", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    # --- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = POLL
        while not self._stop.is_set():
            try:
                self.sync_once()
                backoff = POLL
            except Exception as e:  # the store may fail in any way: the local copy keeps serving
                if self.down is None:
                    logger.warning(
                        "claudeflare: %s unreachable, serving from the local copy: %s", self.name, type(e).__name__
                    )
                self.down = type(e).__name__
                backoff = min(MAX_BACKOFF, backoff * 2)
            self._stop.wait(backoff)

    def sync_once(self) -> None:
        """Publish what is new here (everything live, after an outage), then merge what is new there."""
        fresh = []
        while True:
            try:
                fresh.append(replace(self._outbox.get_nowait(), by=self.origin))
            except queue.Empty:
                break
        now = time.time()
        for event in fresh:
            self._remember(event)
        if self.down is not None:
            self.resync()
            fresh = [e for e in self._known.values() if e.until > now]
        if fresh:
            self.write(fresh)
        if self.down is not None:
            logger.info("claudeflare: %s reachable again, re-synced", self.name)
            self.down = None
        events = [e for e in self.read_new() if e.until > now and e.by != self.origin]
        for event in events:
            self._remember(event)
        self.sync_credentials()
        if events:
            self.apply(events)

    def _remember(self, event: Event) -> None:
        self._known.pop(event.slot, None)  # re-inserted last: the dict stays oldest first
        self._known[event.slot] = event
        if len(self._known) > MAX_KNOWN:
            now = time.time()
            if now >= self._next_sweep:  # a full sweep at most once a minute, not on every event past the cap
                for slot in [s for s, e in self._known.items() if e.until <= now]:
                    del self._known[slot]
                self._next_sweep = now + 60
            while len(self._known) > MAX_KNOWN:
                del self._known[next(iter(self._known))]

    def write(self, events: list[Event]) -> None:
        raise NotImplementedError

    def read_new(self) -> list[Event]:
        raise NotImplementedError

    def resync(self) -> None:
        """Before republishing after an outage (the store may have lost its data)."""

    def sync_credentials(self) -> None:
        """Adopt the shared credentials into the home's store (Redis only)."""

    def claim_usage_read(self, name: str, seconds: float) -> bool:
        """Blocking (a worker thread): whether this proxy reads `name`'s usage endpoint now, the
        fleet's one read for the next `seconds`. True when the store can't tell: reads stay bounded
        per proxy."""
        return True

    # --- token refreshes (the refresher's worker thread) ------------------------------------------

    @contextlib.contextmanager
    def refresh_lock(self, name: str) -> Iterator[None]:
        """Held across a refresh of account `name` by every instance (with the home's file lock)."""
        yield

    def adopt_credential(self, name: str, store: CredentialStore) -> None:
        """Under the refresh lock: a newer shared credential for `name` into `store`."""

    def share_credential(self, name: str, credential: Credential) -> None:
        """Under the refresh lock, before use: `credential` is the one every instance uses now."""


class HomeState(SharedState):
    """`state.db` in the home: one append-only table of events, read by id, pruned of the expired."""

    name = "state.db"

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.path = home / STATE_FILE
        self._db: sqlite3.Connection | None = None
        self._last = 0
        self._next_prune = 0.0

    def connection(self) -> sqlite3.Connection:
        """The state thread's own."""
        if self._db is None:
            self._db = self.connect()
        return self._db

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        enable_wal(db)
        db.execute(
            "create table if not exists events (id integer primary key autoincrement, body text not null, until real not null)"
        )
        db.execute("create index if not exists events_until on events(until)")
        db.execute("create table if not exists usage_claims (account text primary key, next_at real not null)")
        return db

    def claim_usage_read(self, name: str, seconds: float) -> bool:
        now = time.time()
        try:
            with contextlib.closing(self.connect()) as db, db:
                db.execute("begin immediate")
                row = db.execute("select next_at from usage_claims where account = ?", (name,)).fetchone()
                if row and row[0] > now:
                    return False
                db.execute("insert or replace into usage_claims values (?, ?)", (name, now + seconds))
                return True
        except sqlite3.Error as e:
            logger.warning("claudeflare: cannot claim the usage read of %s in %s: %s", name, self.path, e)
            return True

    def write(self, events: list[Event]) -> None:
        db = self.connection()
        with db:  # one transaction
            db.execute("begin immediate")
            db.executemany("insert into events (body, until) values (?, ?)", [(e.to_json(), e.until) for e in events])
        now = time.time()
        if now >= self._next_prune:
            db.execute("delete from events where until < ?", (now,))
            self._next_prune = now + 60

    def read_new(self) -> list[Event]:
        rows = (
            self.connection()
            .execute("select id, body from events where id > ? order by id limit ?", (self._last, MAX_READ))
            .fetchall()
        )
        if rows:
            self._last = rows[-1][0]
        return [e for _, body in rows if (e := Event.parse(body))]


class RedisState(SharedState):
    """Events in a capped stream; OAuth credentials in a hash with a version counter."""

    EVENTS, CREDENTIALS, VERSION = "claudeflare:events", "claudeflare:credentials", "claudeflare:credentials:version"
    MAX_EVENTS = 100_000
    # Deletes the lock only if it still holds our token: an expired lock someone else took stays theirs.
    RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    def __init__(self, url: str, home: Path) -> None:
        super().__init__(home)
        import redis  # only when configured

        self.name = f"Redis at {where(url)}"
        self.redis = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True)
        self.store = CredentialStore(home)
        self._last = "0-0"
        self._version: str | None = None
        self._pushed = False  # the home's credentials offered to Redis since (re)connecting

    def write(self, events: list[Event]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self.EVENTS, {"e": event.to_json()}, maxlen=self.MAX_EVENTS, approximate=True)
        pipe.execute()

    def read_new(self) -> list[Event]:
        found = self.redis.xread({self.EVENTS: self._last}, count=MAX_READ) or []
        events = []
        for _stream, entries in found:
            for entry_id, fields in entries:
                self._last = entry_id
                if event := Event.parse(fields.get("e")):
                    events.append(event)
        return events

    def resync(self) -> None:
        info = self.redis.xinfo_stream(self.EVENTS) if self.redis.exists(self.EVENTS) else None
        if info is None or _stream_id(info["last-generated-id"]) < _stream_id(self._last):
            self._last = "0-0"  # Redis restarted without its data: read all again
        self._version, self._pushed = None, False

    # --- credentials ------------------------------------------------------------------------------

    def sync_credentials(self) -> None:
        try:
            self._sync_credentials()
        except CredentialStoreError:
            pass  # the home's file is broken: the PoolWatcher says so, and events go on syncing

    def _sync_credentials(self) -> None:
        if not self._pushed:
            for name, credential in self.store.credentials().items():
                if credential.refresh_token:
                    self._offer(name, credential)
            self._pushed = True
        version = self.redis.get(self.VERSION)
        if version == self._version:
            return
        self._version = version
        for name in self.redis.hkeys(self.CREDENTIALS):
            if NAME_RE.fullmatch(name):
                with self.store.account_lock(name):
                    self._adopt(name, self.store)

    def _offer(self, name: str, credential: Credential) -> None:
        """Into Redis if newer than what Redis holds (a fresh log-in here, or a first instance)."""
        shared = self._shared(name)
        if shared is None or _newer(credential, shared):
            self._share(name, credential)

    def _shared(self, name: str) -> Credential | None:
        raw = self.redis.hget(self.CREDENTIALS, name)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            return None
        if data is None or entry_problem("accounts", data):
            return None
        credential = Credential.from_json(data)
        return credential if credential.well_formed else None

    def adopt_credential(self, name: str, store: CredentialStore) -> None:
        with self._tolerant("reading the shared token of " + name):
            self._adopt(name, store)

    def share_credential(self, name: str, credential: Credential) -> None:
        # The home's store has it too: after an outage, `sync_credentials` offers it again.
        with self._tolerant("sharing the token of " + name):
            self._share(name, credential)

    @contextlib.contextmanager
    def _tolerant(self, what: str) -> Iterator[None]:
        """For the refresher: with Redis down, a refresh goes on under the home's lock alone."""
        import redis

        try:
            yield
        except redis.RedisError as e:
            logger.warning("claudeflare: %s failed (%s unreachable: %s)", what, self.name, type(e).__name__)

    def _adopt(self, name: str, store: CredentialStore) -> None:
        shared = self._shared(name)
        local = store.credentials().get(name)
        if shared and (local is None or _newer(shared, local)):
            store.set_account(name, shared)
            logger.info("claudeflare: took the token of %s that another instance rotated", name)

    def _share(self, name: str, credential: Credential) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.CREDENTIALS, name, json.dumps(credential.to_json()))
        pipe.incr(self.VERSION)
        pipe.execute()

    def claim_usage_read(self, name: str, seconds: float) -> bool:
        claimed = True
        with self._tolerant("claiming the usage read of " + name):
            claimed = bool(self.redis.set(f"claudeflare:usage:{name}", "1", nx=True, px=max(1, int(seconds * 1000))))
        return claimed

    @contextlib.contextmanager
    def refresh_lock(self, name: str) -> Iterator[None]:
        key, token = f"claudeflare:refresh:{name}", secrets.token_hex(16)
        held = False
        with self._tolerant("taking the refresh lock of " + name):
            deadline = time.monotonic() + LOCK_WAIT
            while not (held := bool(self.redis.set(key, token, nx=True, px=LOCK_TTL_MS))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the refresh lock of {name} is held elsewhere")
                time.sleep(0.05)
        try:
            yield
        finally:
            if held:
                with self._tolerant("releasing the refresh lock of " + name):
                    self.redis.eval(self.RELEASE, 1, key, token)


def _newer(a: Credential, b: Credential) -> bool:
    """Whether `a` replaces `b`: a later expiry, or the same tokens now refused (needs_login)."""
    if (a.expires_at or 0) != (b.expires_at or 0):
        return (a.expires_at or 0) > (b.expires_at or 0)
    return a.refresh_token == b.refresh_token and a.needs_login and not b.needs_login


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# --- the proxy's side --------------------------------------------------------------------------


def connect(shared: SharedState, balancer, health, refresher, usage_poller) -> None:
    """What the balancer binds, Health benches and the usage endpoint says is published; usage reads
    and refreshes go through `shared`."""
    balancer.on_bind = lambda key, name, seconds: shared.publish(Event("bind", key, name, time.time() + seconds))
    health.on_bench = lambda name, until, family, reason: shared.publish(
        Event("bench", f"{name}/{family or ''}", name, until, family, reason)
    )
    usage_poller.claim = lambda name, seconds: asyncio.to_thread(shared.claim_usage_read, name, seconds)
    usage_poller.on_read = lambda name, usage, seconds: shared.publish(
        Event(
            "usage",
            name,
            name,
            time.time() + seconds,
            data={"windows": {w: list(v) for w, v in usage.windows.items()}, "extra": usage.extra},
        )
    )
    if refresher:
        refresher.shared = shared


def owner_event(resource_id: str, account: str | None) -> Event:
    """A file or batch created (`account`) or gone (None); files live until deleted, batches 29 days."""
    if account is None:
        return Event("unowned", resource_id, "", time.time() + OWNER_DAYS * 86400)
    return Event("owner", resource_id, account, time.time() + OWNER_DAYS * 86400)


def merge(events: list[Event], balancer, health, owners, clients=None) -> None:
    """Others' events into the local copy (on the proxy's loop)."""
    now = time.time()
    for event in events:
        if event.until <= now:
            continue
        match event.kind:
            case "bind":
                balancer.adopt(event.key, event.account, event.until - now)
            case "bench":
                health.adopt_bench(event.account, event.until, event.family, event.reason)
            case "usage":
                health.observe_usage(event.account, *event.usage())
            case "owner":
                owners.owners[event.key] = event.account  # the proxy that saw it created logged it
            case "unowned":
                owners.owners.pop(event.key, None)
            case "load":
                balancer.adopt_load(event.key, event.account, event.data["n"], event.until - now)
            case "client" if clients:
                clients.adopt_counts(
                    event.key, event.account, event.data["n"], event.data["minute"], event.data["admitted"], event.until
                )


def counts(balancer, clients) -> dict[tuple[str, str], dict]:
    """This proxy's counters: requests in flight per account; per client key, in flight and admitted
    this minute (client_limits.py)."""
    found = {("load", name): {"n": n} for name, n in balancer.in_flight.items()}
    if clients:
        minute, admitted = clients.minute
        if minute != int(time.time() // 60):
            admitted = {}  # that minute is over: nothing admitted in this one yet
        for client in clients.in_flight.keys() | admitted.keys():
            found[("client", client)] = {
                "n": clients.in_flight[client],
                "minute": minute,
                "admitted": admitted.get(client, 0),
            }
    return found


async def publish_load(
    current: Callable[[], SharedState | None], balancer, clients=None, every: float = LOAD_EVERY
) -> None:
    """This proxy's counters for the other proxies, checked each second: a changed one at once, a
    standing one before it lapses (a dead proxy's lapse), a zero once; an idle proxy is quiet."""
    shown: dict[tuple[str, str], tuple[dict, float]] = {}  # (kind, name) -> (data, when published)
    while True:
        if shared := current():
            now, found = time.time(), counts(balancer, clients)
            for kind, name in shown.keys() | found.keys():
                data = found.get((kind, name)) or dict.fromkeys(shown[kind, name][0], 0)
                before, at = shown.get((kind, name), (None, 0.0))
                idle = not data["n"] and not data.get("admitted")
                if data != before or (not idle and now - at >= LOAD_TTL / 2):
                    shared.publish(Event(kind, f"{shared.origin}{kind}:{name}", name, now + LOAD_TTL, data=data))
                    shown[kind, name] = (data, now)
                if idle:
                    shown.pop((kind, name), None)
        await asyncio.sleep(every)
