"""`claudeflare tui`: watch and steer the pool from a terminal (Textual).

It reaches the running proxy as the dashboard does, through the flow log (read-only) and table
account_status, and changes accounts as the CLI does (manage.py, enrol.py: accounts.toml, which the
proxy reloads within a second). Every read and edit runs in a worker thread, never on Textual's loop.
Everything shown from the log is data, never markup: cells are `Text`, built in `cell`.
"""

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import segno
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, OptionList, Select, Sparkline, Static

from . import enrol, manage, stats
from .accounts import TIERS, Account, AccountsError, load_accounts
from .cli import describe_expiry, duration
from .config import DB_FILE, STRATEGIES, default_strategy
from .credentials import CredentialStoreError
from .flowlog import account_status
from .listing import STATUS_FRESH, account_rows
from .oauth import OAuthError

RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
LATEST = 100  # requests listed
SPARK_MINUTES = 60
REFRESH = 1.0  # seconds
FAILURES = (AccountsError, OAuthError, CredentialStoreError, OSError)  # their messages hold no secret


def failure(e: Exception) -> str:
    """What to tell the user: the message of an expected failure, else only its kind (it might quote a secret)."""
    return str(e) if isinstance(e, FAILURES) else f"unexpected error ({type(e).__name__})"


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class Snapshot:
    accounts: list[dict] = field(default_factory=list)
    problem: str | None = None  # a broken accounts.toml or credential store, in one line
    proxy_running: bool = False
    strategy: str = ""
    totals: dict = field(default_factory=dict)
    per_minute: list[int] = field(default_factory=list)
    latest: list[dict] = field(default_factory=list)


def load_snapshot(
    home: Path, range_key: str = "1h", account: str | None = None, errors_only: bool = False, now: float | None = None
) -> Snapshot:
    """One refresh: a handful of indexed range queries on the flow log, and the two files."""
    now = time.time() if now is None else now
    db = home / DB_FILE
    snap = Snapshot()
    try:
        snap.accounts = account_rows(home)
        snap.strategy = load_accounts(home).strategy or f"{default_strategy()} (proxy option)"
    except (AccountsError, CredentialStoreError) as e:
        snap.problem = str(e)
    status = account_status(db)
    live_after = datetime.fromtimestamp(now - STATUS_FRESH, UTC).isoformat()
    snap.proxy_running = any((r["updated_at"] or "") >= live_after for r in status.values())
    midnight = datetime.fromtimestamp(now).astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    cost_today = stats.cost_per_account(db, midnight.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    for row in snap.accounts:
        seen = status.get(row["name"]) or {}
        row["requests_in_flight"] = seen.get("requests_in_flight") if snap.proxy_running else None
        row["cost_today"] = cost_today.get(row["name"], 0.0)
    since = iso(now - RANGES[range_key])
    snap.totals = stats.totals(db, since)
    first_minute = int(now // 60) - SPARK_MINUTES + 1
    minutes = stats.requests_per_minute(db, iso(first_minute * 60))
    snap.per_minute = [minutes.get(iso(m * 60)[:16], 0) for m in range(first_minute, first_minute + SPARK_MINUTES)]
    snap.latest = stats.latest_requests(db, since, LATEST, account, errors_only)
    return snap


# --- formatting: plain functions of plain values --------------------------------------------------


def cell(value) -> Text:
    """A table cell: whatever a client sent shows as text, never as markup."""
    return Text("-" if value is None or value == "" else str(value), no_wrap=True)


def bar(fraction: float | None, reset: str | None, width: int = 8, now: float | None = None) -> Text:
    if fraction is None:
        return cell(None)
    filled = max(0, min(width, round(fraction * width)))
    style = "red" if fraction >= 0.95 else "yellow" if fraction >= 0.8 else "green"
    text = Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim") + Text(f" {fraction:.0%}")
    return text + Text(f" ↻{until(reset, now)}" if until(reset, now) else "")


def until(when: str | None, now: float | None = None) -> str:
    """`2h13m` until an ISO time, '' when it is past or unreadable."""
    try:
        left = datetime.fromisoformat(when).timestamp() - (time.time() if now is None else now)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    return duration(left) if left > 0 else ""


def tokens(n) -> str:
    n = n or 0
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,}"


def ms(value) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def local_time(when: str | None, format: str = "%H:%M:%S") -> str:
    try:
        return datetime.fromisoformat(when).astimezone().strftime(format)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"


def status_text(row: dict) -> Text:
    value = row["status"] if row["status"] is not None else (row["error"] or "no reply")
    return Text(str(value), style="red" if row["is_error"] else "green", no_wrap=True)


def failover_count(row: dict) -> int:
    """Failed attempts before the reply the client got (the failovers column, a JSON list)."""
    try:
        failed = json.loads(row["failovers"] or "[]")
    except (TypeError, ValueError):
        return 0
    return len(failed) if isinstance(failed, list) else 0


def share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.1%}"


def totals_text(totals: dict, range_key: str) -> Text:
    if not totals or not totals.get("requests"):
        return Text(f"last {range_key}: no requests")
    t = totals
    return Text(
        f"last {range_key}: {t['requests']:,} requests · tokens in {tokens(t['input_tokens'])} out {tokens(t['output_tokens'])} "
        f"cache read {tokens(t['cache_read'])} write {tokens(t['cache_write'])} · ${t['cost_usd']:.2f} · "
        f"errors {share(t['error_rate'])} · cache hit {share(t['cache_hit_ratio'])} · p95 TTFB {ms(t['ttfb_p95_ms'])}"
    )


def qr_text(data: str) -> Text:
    """A QR code in half blocks, two modules a character, dark on light whatever the terminal's colours."""
    rows = [list(r) for r in segno.make(data, error="l").matrix_iter(border=2)]
    if len(rows) % 2:
        rows.append([0] * len(rows[0]))
    chars = {(1, 1): "█", (1, 0): "▀", (0, 1): "▄", (0, 0): " "}
    lines = [
        "".join(chars[(top, bottom)] for top, bottom in zip(rows[i], rows[i + 1], strict=True))
        for i in range(0, len(rows), 2)
    ]
    return Text("\n".join(lines), style="black on white", no_wrap=True)


ACCOUNT_COLUMNS = (
    "name",
    "mode",
    "tier",
    "prio",
    "state",
    "5h",
    "7d",
    "limited until",
    "token",
    "busy",
    "today",
    "$ today",
)
REQUEST_COLUMNS = ("time", "account", "client", "model", "status", "TTFB", "tokens", "cost", "failovers")


def safe(cells, row: dict, columns: tuple) -> list[Text]:
    """A row's cells, or a row saying it is unreadable: one odd value in the log must not stop the screen."""
    try:
        return cells(row)
    except (TypeError, ValueError, KeyError, OverflowError):
        return [cell("(unreadable row)"), *(cell(None) for _ in columns[1:])]


def account_cells(row: dict, now: float | None = None) -> list[Text]:
    state = row["state"] + (f" ({row['reason']})" if row["reason"] else "")
    return [
        cell(row["name"]),
        cell(row["mode"]),
        cell(row["tier"]),
        cell(row["priority"]),
        Text(state, style="green" if row["state"] == "ok" else "yellow", no_wrap=True),
        bar(row["utilization_5h"], row["reset_5h"], now=now),
        bar(row["utilization_7d"], row["reset_7d"], now=now),
        cell(
            until(row["limited_until"], now)
            and f"{local_time(row['limited_until'], '%a %H:%M')} ({until(row['limited_until'], now)})"
        ),
        cell(describe_expiry(row["token_expires_at"], now).removeprefix("expires in ")),
        cell(row["requests_in_flight"]),
        cell(row["requests_today"]),
        cell(f"${row['cost_today'] or 0:.2f}"),
    ]


def request_cells(row: dict) -> list[Text]:
    return [
        cell(local_time(row["started_at"])),
        cell(row["account"]),
        cell(row["client"]),
        cell(row["model"]),
        status_text(row),
        cell(ms(row["ttfb_ms"])),
        cell(tokens(row["tokens_total"])),
        cell(f"${row['cost_usd'] or 0:.4f}"),
        cell(failover_count(row) or ""),
    ]


# --- dialogs ---------------------------------------------------------------------------------------


class Confirm(ModalScreen[bool]):
    BINDINGS = [("y", "answer(True)", "Yes"), ("n", "answer(False)", "No"), ("escape", "answer(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Text(self.question))
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def tier_select(value: int = 1) -> Select:
    return Select([(str(t), t) for t in TIERS], value=value, allow_blank=False, id="tier")


def priority_value(text: str) -> int:
    try:
        return int(text.strip() or "0")
    except ValueError:
        raise AccountsError("priority must be a whole number") from None


class Form(ModalScreen[dict | None]):
    """A dialog of fields; Enter in the last field (or the OK button) submits, Escape cancels."""

    BINDINGS = [("escape", "cancel", "Cancel")]

    def values(self) -> dict:
        raise NotImplementedError

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self.submit()
        else:
            self.dismiss(None)

    def submit(self) -> None:
        try:
            self.dismiss(self.values())
        except AccountsError as e:
            self.notify(str(e), severity="error", markup=False)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def buttons(self) -> ComposeResult:
        with Horizontal(classes="buttons"):
            yield Button("OK", id="ok", variant="primary")
            yield Button("Cancel", id="cancel")


class TierForm(Form):
    def __init__(self, account: dict):
        super().__init__()
        self.account = account

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Text(f"Tier and priority of {self.account['name']}"))
            yield tier_select(self.account["tier"])
            yield Input(str(self.account["priority"]), placeholder="priority (lower is preferred)", id="priority")
            yield from self.buttons()

    def values(self) -> dict:
        return {
            "tier": self.query_one("#tier", Select).value,
            "priority": priority_value(self.query_one("#priority", Input).value),
        }


class ApiKeyForm(Form):
    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Add an API-key account")
            yield Input(placeholder="name", id="name")
            yield tier_select()
            yield Input("0", placeholder="priority", id="priority")
            yield Input(placeholder="API key (hidden)", password=True, id="key")
            yield from self.buttons()

    def values(self) -> dict:
        key = self.query_one("#key", Input)
        account = enrol.new_account(
            self.query_one("#name", Input).value.strip(),
            "api-key",
            self.query_one("#tier", Select).value,
            priority_value(self.query_one("#priority", Input).value),
        )
        values = {"account": account, "key": key.value}
        key.value = ""  # the key leaves the screen with the dialog's answer
        return values


class StrategyPicker(ModalScreen[str | None]):
    BINDINGS = [("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Strategy for new requests")
            yield OptionList(*STRATEGIES, id="strategies")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(STRATEGIES[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)


class OAuthLogin(ModalScreen[str | None]):
    """Name and mode, then the authorization link (copy it, or show a QR code for a phone), then the
    pasted CODE#STATE. The PKCE verifier stays in this screen; the exchange runs in a thread.
    With `again` (an existing OAuth account), the log-in replaces that account's credentials."""

    BINDINGS = [("escape", "cancel", "Cancel"), Binding("f2", "copy", "Copy link"), Binding("f3", "qr", "QR code")]

    def __init__(self, home: Path, taken: frozenset[str] = frozenset(), again: Account | None = None):
        super().__init__()
        self.home = home
        self.taken = taken  # names already in use, to refuse before the log-in rather than after
        self.again = again
        self.flow = None
        self.url = ""
        self.account = again
        self.qr_shown = False

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            if self.again:
                yield Label(Text(f"Log {self.again.name} in again ({self.again.mode})"))
            else:
                yield Label("Log in an OAuth account (max: Pro/Max; console: mints an API key)")
                yield Input(placeholder="name", id="name")
                yield Select([("max", "max"), ("console", "console")], value="max", allow_blank=False, id="mode")
                yield tier_select(5)
                yield Input("0", placeholder="priority", id="priority")
            yield Button("Get the log-in link", id="start", variant="primary")
            yield Static(id="link")
            yield Static(id="qr")
            yield Input(placeholder="paste CODE#STATE here (hidden)", password=True, id="code", disabled=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.start()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "code":
            event.input.value = ""  # never shown again, even if refused
            self.finish(event.value)
        elif self.flow is None:
            self.start()

    def start(self) -> None:
        try:
            if not self.again:
                self.account = enrol.new_account(
                    self.query_one("#name", Input).value.strip(),
                    self.query_one("#mode", Select).value,
                    self.query_one("#tier", Select).value,
                    priority_value(self.query_one("#priority", Input).value),
                )
                if self.account.name in self.taken:
                    raise AccountsError(f"an account named {self.account.name!r} already exists")
            self.flow, self.url = enrol.start_oauth(self.account.mode)  # local: PKCE values and a link
        except AccountsError as e:
            self.notify(str(e), severity="error", markup=False)
            return
        for field_ in self.query("#name, #mode, #tier, #priority, #start"):  # fixed from here on: room for the QR code
            field_.display = False
        self.query_one("#link", Static).update(
            Text(
                f"{self.account.name} ({self.account.mode}): open this link, log in, paste the code below "
                f"(F2 copies it, F3 shows a QR code for another device):\n{self.url}"
            )
        )
        code = self.query_one("#code", Input)
        code.disabled = False
        code.focus()

    def action_copy(self) -> None:
        if self.url:
            self.app.copy_to_clipboard(self.url)
            self.notify("link copied", markup=False)

    def action_qr(self) -> None:
        if self.url:
            self.qr_shown = not self.qr_shown
            self.query_one("#qr", Static).update(qr_text(self.url) if self.qr_shown else "")

    @work(thread=True, exclusive=True, group="oauth")
    def finish(self, pasted: str) -> None:
        try:
            if self.again:
                enrol.finish_relogin(self.home, self.account, self.flow, pasted)
            else:
                enrol.finish_oauth(self.home, self.account, self.flow, pasted)
        except Exception as e:  # the app outlives any failure
            self.app.call_from_thread(self.notify, failure(e), severity="error", markup=False)
            return
        account = self.account
        done = (
            f"logged in {account.name}" if self.again else f"added {account.name} ({account.mode}, tier {account.tier})"
        )
        self.app.call_from_thread(self.dismiss, done)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Details(ModalScreen[None]):
    BINDINGS = [("escape", "close", "Close"), ("q", "close", "Close")]

    def __init__(self, title: str, body: Text | None = None, rows: list[dict] | None = None):
        super().__init__()
        self.title_text, self.body, self.rows = title, body, rows

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide tall"):
            yield Label(Text(self.title_text))
            if self.rows is not None:
                table = DataTable(id="conversation", cursor_type="row")
                table.add_columns(*REQUEST_COLUMNS)
                for row in self.rows:
                    table.add_row(*safe(request_cells, row, REQUEST_COLUMNS), key=row["id"])
                yield table
            else:
                yield VerticalScroll(Static(self.body, id="detail"))

    def action_close(self) -> None:
        self.dismiss(None)


def detail_text(row: dict) -> Text:
    width = max(map(len, row))
    return Text("\n".join(f"{k.ljust(width)}  {'-' if v is None else v}" for k, v in row.items()))


# --- the app ---------------------------------------------------------------------------------------


class PoolApp(App):
    TITLE = "Claudeflare"
    CSS = """
    #banner { background: $error; color: $text; padding: 0 1; }
    #problem { background: $warning; color: $text; padding: 0 1; }
    #accounts { height: auto; max-height: 45%; border: round $primary; }
    #totals { padding: 0 1; height: auto; }
    #spark { height: 2; margin: 0 1; }
    #filters { padding: 0 1; color: $text-muted; }
    #requests { height: 1fr; border: round $primary; }
    .dialog { width: 70; height: auto; max-height: 90%; padding: 1 2; border: thick $accent; background: $surface; }
    .wide { width: 90%; }
    .tall { height: 90%; }
    .buttons { height: auto; margin-top: 1; }
    Confirm, Form, StrategyPicker, OAuthLogin, Details { align: center middle; }
    """
    BINDINGS = [
        Binding("p", "pause", "Pause"),
        Binding("u", "resume", "Resume"),
        Binding("x", "remove", "Remove"),
        Binding("t", "tier", "Tier"),
        Binding("s", "strategy", "Strategy"),
        Binding("a", "add_key", "Add key"),
        Binding("o", "add_oauth", "OAuth"),
        Binding("l", "login_again", "Log in again"),
        Binding("f", "filter_account", "Account"),
        Binding("e", "errors_only", "Errors"),
        Binding("r", "range", "Range"),
        Binding("d", "details", "Details"),
        Binding("c", "conversation", "Conversation"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, home: Path, refresh: float = REFRESH):
        super().__init__()
        self.home = home
        self.refresh_every = refresh
        self.range_key = "1h"
        self.account_filter: str | None = None
        self.errors_only = False
        self.snapshot = Snapshot()
        self.loading = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="banner")
        yield Static(id="problem")
        yield DataTable(id="accounts", cursor_type="row")
        yield Static(id="totals")
        yield Sparkline([0], id="spark")
        yield Static(id="filters")
        yield DataTable(id="requests", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        accounts, requests = self.query_one("#accounts", DataTable), self.query_one("#requests", DataTable)
        accounts.add_columns(*ACCOUNT_COLUMNS)
        requests.add_columns(*REQUEST_COLUMNS)
        accounts.border_title, requests.border_title = "Accounts", "Latest requests"
        self.query_one("#banner").display = self.query_one("#problem").display = False
        self.prepare()
        if self.refresh_every:
            self.set_interval(self.refresh_every, self.reload)

    @work(thread=True, group="load")
    def prepare(self) -> None:
        stats.migrated(self.home / DB_FILE)  # once: an older log gains the views the figures use
        self.load()

    def reload(self):
        """Start a refresh unless one is running (a slow disk must not pile them up); the worker or None."""
        if self.loading:
            return None
        self.loading = True
        return self.run_worker(self.load, thread=True, group="load")

    def load(self) -> None:
        try:
            snap = load_snapshot(self.home, self.range_key, self.account_filter, self.errors_only)
        except Exception as e:  # a damaged or locked log: say so, try again next second
            snap = Snapshot(problem=f"cannot read {self.home / DB_FILE}: {failure(e)}")
        finally:
            self.loading = False
        self.call_from_thread(self.show, snap)

    def show(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.sub_title = f"strategy {snap.strategy}" if snap.strategy else ""
        banner = self.query_one("#banner", Static)
        banner.display = not snap.proxy_running
        banner.update(
            Text(
                f"No proxy running: nothing in {self.home / DB_FILE} (table account_status) for {STATUS_FRESH} s. "
                "Changes are saved to accounts.toml and apply when the proxy starts."
            )
        )
        problem = self.query_one("#problem", Static)
        problem.display = snap.problem is not None
        problem.update(Text(snap.problem or ""))
        fill(
            self.query_one("#accounts", DataTable),
            [(r["name"], safe(account_cells, r, ACCOUNT_COLUMNS)) for r in snap.accounts],
        )
        self.query_one("#totals", Static).update(totals_text(snap.totals, self.range_key))
        self.query_one("#spark", Sparkline).data = snap.per_minute or [0]
        self.query_one("#filters", Static).update(
            Text(
                f"latest requests · account: {self.account_filter or 'all'} · {'errors only' if self.errors_only else 'all statuses'}"
                f" · range {self.range_key} · requests per minute above, last {SPARK_MINUTES} min"
            )
        )
        fill(
            self.query_one("#requests", DataTable),
            [(r["id"], safe(request_cells, r, REQUEST_COLUMNS)) for r in snap.latest],
        )

    # --- which account, which request ---

    def selected_account(self) -> dict | None:
        table = self.query_one("#accounts", DataTable)
        if not table.row_count:
            self.notify("no account selected", severity="warning", markup=False)
            return None
        name = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((a for a in self.snapshot.accounts if a["name"] == name), None)

    def selected_request(self) -> dict | None:
        table = self.query_one("#requests", DataTable)
        if not table.row_count:
            self.notify("no request selected", severity="warning", markup=False)
            return None
        request_id = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((r for r in self.snapshot.latest if r["id"] == request_id), None)

    # --- changes: in a thread, then a refresh ---

    @work(thread=True, group="change")
    def change(self, fn, done: str) -> None:
        try:
            fn()
        except Exception as e:  # the app outlives any failure
            self.call_from_thread(self.notify, failure(e), severity="error", markup=False)
            return
        self.call_from_thread(self.notify, done, markup=False)
        self.load()

    def action_pause(self) -> None:
        if account := self.selected_account():
            self.change(lambda: manage.set_paused(self.home, account["name"], True), f"{account['name']} paused")

    def action_resume(self) -> None:
        if account := self.selected_account():
            self.change(lambda: manage.set_paused(self.home, account["name"], False), f"{account['name']} resumed")

    def action_remove(self) -> None:
        if account := self.selected_account():
            name = account["name"]

            def answered(yes: bool | None) -> None:
                if yes:
                    self.change(lambda: enrol.remove_account(self.home, name), f"removed {name}")

            self.push_screen(Confirm(f"Remove account {name} and its stored credentials?"), answered)

    def action_tier(self) -> None:
        if account := self.selected_account():
            name = account["name"]

            def answered(values: dict | None) -> None:
                if values:
                    self.change(
                        lambda: manage.set_tier_priority(self.home, name, values["tier"], values["priority"]),
                        f"{name}: tier {values['tier']}, priority {values['priority']}",
                    )

            self.push_screen(TierForm(account), answered)

    def action_strategy(self) -> None:
        def answered(name: str | None) -> None:
            if name:
                self.change(lambda: manage.set_strategy(self.home, name), f"strategy: {name}")

        self.push_screen(StrategyPicker(), answered)

    def action_add_key(self) -> None:
        def answered(values: dict | None) -> None:
            if values:
                account = values["account"]
                self.change(
                    lambda: enrol.add_api_key_account(self.home, account, values.pop("key")),
                    f"added {account.name} (api-key, tier {account.tier})",
                )

        self.push_screen(ApiKeyForm(), answered)

    def action_add_oauth(self) -> None:
        self.push_screen(OAuthLogin(self.home, frozenset(a["name"] for a in self.snapshot.accounts)), self.added)

    def action_login_again(self) -> None:
        if account := self.selected_account():
            if account["mode"] not in enrol.OAUTH_MODES:
                self.notify(
                    f"{account['name']} is an api-key account: remove it and add it again with a new key",
                    severity="warning",
                    markup=False,
                )
                return
            self.push_screen(OAuthLogin(self.home, again=Account(account["name"], account["mode"])), self.added)

    def added(self, done: str | None) -> None:
        if done:
            self.notify(done, markup=False)
            self.reload_now()

    def action_filter_account(self) -> None:
        names = [None, *(a["name"] for a in self.snapshot.accounts)]
        at = names.index(self.account_filter) if self.account_filter in names else 0
        self.account_filter = names[(at + 1) % len(names)]
        self.reload_now()

    def action_errors_only(self) -> None:
        self.errors_only = not self.errors_only
        self.reload_now()

    def action_range(self) -> None:
        keys = list(RANGES)
        self.range_key = keys[(keys.index(self.range_key) + 1) % len(keys)]
        self.reload_now()

    def reload_now(self) -> None:
        self.run_worker(self.load, thread=True, group="load")

    @work(thread=True, group="open")
    def action_details(self) -> None:
        if request := self.call_from_thread(self.selected_request):
            row = stats.request_detail(self.home / DB_FILE, request["id"])
            if row:
                self.call_from_thread(self.push_screen, Details(f"Request {row['id']}", body=detail_text(row)))

    @work(thread=True, group="open")
    def action_conversation(self) -> None:
        request = self.call_from_thread(self.selected_request)
        if request and request["session"]:
            rows = stats.conversation(self.home / DB_FILE, request["session"])
            self.call_from_thread(
                self.push_screen, Details(f"Conversation {request['session']}: {len(rows)} request(s)", rows=rows)
            )
        elif request:
            self.call_from_thread(self.notify, "this request has no conversation", severity="warning", markup=False)


def fill(table: DataTable, rows: list[tuple[str, list[Text]]]) -> None:
    """Replace a table's rows, the cursor staying on the same row (by key) where it still is."""
    keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value if table.row_count else None
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    keys = [key for key, _ in rows]
    if keep in keys:
        table.move_cursor(row=keys.index(keep), animate=False)


def run(home: Path) -> None:
    PoolApp(home).run()
