"""`claudeflare`: enrol and manage the pool's accounts and client keys.

Every command edits files in the home folder; a running proxy notices within a second.
Secrets are read from a hidden prompt or standard input, never from the command line.
"""

import json
import os
import re
import secrets
import sys
import time
import webbrowser
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from . import alerts, manage, providers, supervisor
from . import enrol as enrolment
from .accounts import (
    MODES,
    PRIORITY_MAX,
    PRIORITY_MIN,
    TIERS,
    Account,
    AccountsError,
    check_name,
    edit_accounts,
    hash_client_key,
    load_accounts,
)
from .client_rules import PERIODS, SPEND_SQL, LimitsError, budget_rows, parse_limits, period_starts
from .clock import utc_now
from .config import (
    ACCOUNTS_FILE,
    DB_FILE,
    STRATEGIES,
    HomeError,
    check_home,
    default_strategy,
    ensure_home,
    resolve_home,
)
from .credentials import SECRET_RE, Credential, CredentialStore, CredentialStoreError
from .flowlog import open_db, query_readonly
from .listing import account_rows
from .oauth import OAuthError, OAuthSettings
from .providers.compatible import AUTHS
from .refresh import TokenRefresher
from .stats import per_account, per_client

CLAUDE_CODE_CREDENTIALS = Path("~/.claude/.credentials.json")
# A link to the checkout's top-level file (edits show at the next start); a wheel holds a copy instead.
METADATA = (Path(__file__).resolve().parent / "datasette-metadata.yml").resolve()


class Context:
    def __init__(self, home: Path):
        self.home = home

    def edit(self, change) -> None:
        try:
            edit_accounts(ensure_home(self.home), change)
        except AccountsError as e:
            raise click.ClickException(str(e)) from None

    def store(self) -> CredentialStore:
        return CredentialStore(ensure_home(self.home))


pass_ctx = click.make_pass_decorator(Context)


class Group(click.Group):
    """A broken accounts.toml or credentials.json is the user's to fix: say which file and where, in
    one line, whatever the command (never a traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (AccountsError, CredentialStoreError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="claudeflare", prog_name="claudeflare")
@click.option(
    "--home",
    envvar="CLAUDEFLARE_HOME",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder with accounts.toml, credentials and the flow log (env CLAUDEFLARE_HOME; default ~/.config/claudeflare).",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """Pool Claude subscriptions and API keys behind one endpoint."""
    try:
        ctx.obj = Context(check_home(resolve_home(home)))
    except HomeError as e:
        raise click.BadParameter(str(e), param_hint="--home / CLAUDEFLARE_HOME") from None


def read_secret(what: str) -> str:
    if sys.stdin.isatty():
        value = click.prompt(what, hide_input=True)
    else:
        value = sys.stdin.readline()
    return enrolment.check_secret(value, what.lower())


def checked_name(name: str) -> str:
    try:
        return check_name(name)
    except AccountsError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None


def enrol(obj: Context, account: Account, credential: Credential | None) -> None:
    enrolment.enrol(obj.home, account, credential)


def load_accounts_or_fail(home: Path):
    try:
        return load_accounts(home)
    except AccountsError as e:
        raise click.ClickException(str(e)) from None


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output (JSON).")(fn)


def yes_option(fn):
    return click.option("--yes", is_flag=True, help="Do not ask for confirmation.")(fn)


tier_option = click.option(
    "--tier",
    type=click.Choice([str(t) for t in TIERS]),
    default="1",
    show_default=True,
    help="Capacity weight: 1 = Pro or API key, 5 = Max 5x, 20 = Max 20x.",
)
PRIORITY = click.IntRange(PRIORITY_MIN, PRIORITY_MAX)
priority_option = click.option("--priority", type=PRIORITY, default=0, show_default=True, help="Lower is preferred.")


def oauth_login(mode: str, finish) -> None:
    """The PKCE flow: print the link, read the pasted CODE#STATE, then `finish(flow, pasted)` exchanges it."""
    flow, url = enrolment.start_oauth(mode)
    click.echo(f"Open this link, log in, then paste the code the page shows:\n\n  {url}\n", err=True)
    if os.environ.get("DISPLAY") or sys.platform == "darwin":
        webbrowser.open(url)
    pasted = click.prompt("Code", hide_input=True, err=True)
    try:
        finish(flow, pasted)
    except OAuthError as e:
        raise click.ClickException(str(e)) from None


@cli.command()
@click.argument("name")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="max: Pro/Max subscription (OAuth); console: Console OAuth, mints an API key; api-key: a Console API key. "
    "Required for the anthropic provider; other providers' accounts hold a key (api-key).",
)
@tier_option
@priority_option
@click.option(
    "--api-key-env",
    metavar="VAR",
    help="api-key mode: read the key from this environment variable of the proxy instead.",
)
@click.option(
    "--provider",
    type=click.Choice(list(providers.PROVIDERS)),
    default=providers.DEFAULT,
    show_default=True,
    help="Where the account's requests go (README: Providers).",
)
@click.option("--base-url", help="anthropic-compatible: the endpoint's URL (its Messages API is BASE_URL/v1/messages).")
@click.option("--auth", type=click.Choice(AUTHS), help="anthropic-compatible: how the key is sent (default x-api-key).")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="GLOB=MODEL",
    help="anthropic-compatible, vertex: map client models matching GLOB to MODEL (repeat; the first match wins).",
)
@click.option(
    "--region",
    help="vertex: the Vertex AI region (default global); bedrock: the AWS region (default: the AWS chain's).",
)
@click.option("--profile", help="bedrock: the AWS profile whose credentials sign requests (default: the AWS chain's).")
@click.option(
    "--aws-key-pair",
    is_flag=True,
    help="bedrock: sign with a key pair kept in credentials.json, read as ACCESS_KEY_ID and SECRET_ACCESS_KEY "
    "(hidden prompts or two lines of standard input), instead of the AWS chain's credentials.",
)
@click.option("--project", help="vertex: the Google Cloud project (default: the credentials' own).")
@click.option(
    "--credentials-file",
    type=click.Path(dir_okay=False, resolve_path=True),
    help="vertex: a service-account key file (default: Application Default Credentials).",
)
@pass_ctx
def add(
    obj: Context,
    name: str,
    mode: str | None,
    tier: str,
    priority: int,
    api_key_env: str | None,
    provider: str,
    base_url: str | None,
    auth: str | None,
    models: tuple[str, ...],
    region: str | None,
    profile: str | None,
    aws_key_pair: bool,
    project: str | None,
    credentials_file: str | None,
) -> None:
    """Add an account: log in with OAuth, or give an API key (hidden prompt or standard input).

    Example:

    \b
        claudeflare add work-key --mode api-key --tier 1 < key.txt
        claudeflare add ci-key --mode api-key --api-key-env CI_ANTHROPIC_KEY
        claudeflare add my-max --mode max --tier 5 --priority 1
        claudeflare add glm --provider anthropic-compatible --base-url https://api.z.ai/api/anthropic --auth bearer --model 'claude-*=glm-4.6' --priority 1 < key.txt
        claudeflare add gcp --provider vertex --region us-east5 --project my-project --priority 1
        claudeflare add aws --provider bedrock --region us-east-1 --profile claude --priority 1
        claudeflare add aws-keys --provider bedrock --region us-east-1 --aws-key-pair
    """
    checked_name(name)
    mode = mode or ("api-key" if provider != providers.DEFAULT else None)
    if mode is None:
        raise click.UsageError("Missing option '--mode'.")
    if api_key_env and mode != "api-key":
        raise click.UsageError("--api-key-env is for --mode api-key")
    if aws_key_pair and (provider != "bedrock" or profile or api_key_env):
        raise click.UsageError("--aws-key-pair is for provider bedrock, without --profile or --api-key-env")
    settings = provider_settings(
        name,
        provider,
        base_url=base_url,
        auth=auth,
        models=models,
        region=region,
        profile=profile,
        project=project,
        credentials_file=credentials_file,
    )
    refuse_duplicate(obj, name)
    account = Account(name, mode, int(tier), priority, api_key_env=api_key_env, provider=provider, settings=settings)
    if aws_key_pair:
        pair = enrolment.aws_key_pair(read_secret("ACCESS_KEY_ID"), read_secret("SECRET_ACCESS_KEY"))
        enrolment.enrol(obj.home, account, pair)
    elif providers.PROVIDERS[provider].own_credentials:
        enrolment.enrol(obj.home, account, None)  # its credentials are google-auth's or botocore's to find
    elif mode == "api-key":
        enrolment.add_api_key_account(obj.home, account, None if api_key_env else read_secret("API key"))
    else:
        oauth_login(mode, lambda flow, pasted: enrolment.finish_oauth(obj.home, account, flow, pasted))
    click.echo(f"added {name} ({mode if provider == providers.DEFAULT else provider}, tier {tier})")


@cli.command()
@click.argument("name")
@pass_ctx
def login(obj: Context, name: str) -> None:
    """Log an existing OAuth account in again (e.g. when it shows needs-login)."""
    account = enrolment.oauth_account(obj.home, name)
    oauth_login(account.mode, lambda flow, pasted: enrolment.finish_relogin(obj.home, account, flow, pasted))
    click.echo(f"logged in {name}")


@cli.command()
@click.argument("name")
@pass_ctx
def refresh(obj: Context, name: str) -> None:
    """Refresh an OAuth account's token now."""
    find_account(obj, name)
    store = obj.store()
    current = store.credentials().get(name)
    if current is None or not current.refresh_token:
        raise click.ClickException(f"{name} has no refresh token (api-key accounts need none)")
    refresher = TokenRefresher(obj.home, OAuthSettings.from_env())
    try:
        fresh = refresher.refresh_sync(name, rejected=current.access_token)
    except OAuthError as e:
        raise click.ClickException(f"{name}: {e}") from None
    click.echo(f"refreshed {name}, token {describe_expiry(fresh.expires_at)}")


PROVIDER_OPTIONS = {
    "base_url": "--base-url",
    "auth": "--auth",
    "models": "--model",
    "region": "--region",
    "profile": "--profile",
    "project": "--project",
    "credentials_file": "--credentials-file",
}  # `add` option of each key


def provider_settings(name: str, provider: str, **given) -> object:
    """The provider's settings from `add`'s options, checked by the provider as accounts.toml would be."""
    table = {key: value for key, value in given.items() if value}
    if unknown := set(table) - providers.PROVIDERS[provider].keys:
        raise click.UsageError(
            f"{', '.join(PROVIDER_OPTIONS[k] for k in sorted(unknown))}: not for provider {provider}"
        )
    if "models" in table:
        pairs = [m.partition("=") for m in table["models"]]
        if any(not glob or not target for glob, _, target in pairs):
            raise click.UsageError("--model takes GLOB=MODEL, e.g. 'claude-sonnet-*=glm-4.6'")
        table["models"] = {glob: target for glob, _, target in pairs}
    try:
        return providers.PROVIDERS[provider].parse(name, table)
    except providers.ProviderError as e:
        raise click.UsageError(str(e)) from None


def find_account(obj: Context, name: str) -> Account:
    for account in load_accounts_or_fail(obj.home).accounts:
        if account.name == name:
            return account
    raise click.ClickException(f"no account named {name!r} (see `claudeflare list`)")


def refuse_duplicate(obj: Context, name: str) -> None:
    enrolment.refuse_duplicate(obj.home, name)


@cli.command("import")
@click.argument("name")
@click.option(
    "--mode",
    type=click.Choice(["max", "console"]),
    required=True,
    help="max: Pro/Max subscription; console: Console OAuth.",
)
@tier_option
@priority_option
@click.option(
    "--from",
    "source",
    type=click.Path(dir_okay=False, path_type=Path),
    default=str(CLAUDE_CODE_CREDENTIALS),
    show_default=True,
    help="Claude Code's credentials JSON.",
)
@pass_ctx
def import_(obj: Context, name: str, mode: str, tier: str, priority: int, source: Path) -> None:
    """Add an OAuth account from Claude Code's saved login.

    Example:

    \b
        claudeflare import my-max --mode max --tier 5
        claudeflare import team-max --mode max --tier 20 --from backup/credentials.json
    """
    checked_name(name)
    refuse_duplicate(obj, name)
    credential = read_claude_code_credentials(source.expanduser())
    enrol(obj, Account(name, mode, int(tier), priority), credential)
    click.echo(f"imported {name} ({mode}, tier {tier}), token {describe_expiry(credential.expires_at)}")


def read_claude_code_credentials(path: Path) -> Credential:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise click.ClickException(f"{path} not found: log in with Claude Code first, or pass --from FILE") from None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read {path}: {type(e).__name__}") from None
    oauth = data.get("claudeAiOauth") if isinstance(data, dict) else None
    if not isinstance(oauth, dict) or not all(
        isinstance(oauth.get(k), str) and oauth[k] for k in ("accessToken", "refreshToken")
    ):
        raise click.ClickException(f"{path} has no claudeAiOauth.accessToken and refreshToken")
    for key in ("accessToken", "refreshToken"):
        if not SECRET_RE.fullmatch(oauth[key]):
            raise click.ClickException(f"{path}: claudeAiOauth.{key} is malformed")
    expires_ms = oauth.get("expiresAt")
    expires_at = (
        expires_ms / 1000 if isinstance(expires_ms, (int, float)) and not isinstance(expires_ms, bool) else None
    )
    return Credential(access_token=oauth["accessToken"], refresh_token=oauth["refreshToken"], expires_at=expires_at)


def describe_expiry(expires_at: float | None, now: float | None = None) -> str:
    if expires_at is None:
        return "-"
    left = expires_at - (time.time() if now is None else now)
    return f"expires in {duration(left)}" if left > 0 else "expired"


def duration(seconds: float) -> str:
    hours, minutes = divmod(int(seconds // 60), 60)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    click.echo("  ".join(h.upper().replace("_", " ").ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(str(row[h]).ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())


@cli.command("list")
@json_option
@pass_ctx
def list_(obj: Context, as_json: bool) -> None:
    """Show the accounts: mode, tier, priority, state, token expiry, requests today, limits."""
    rows = account_rows(obj.home)  # a broken file: Group says which, in one line
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(
            "no accounts yet: `claudeflare add NAME --mode api-key` or `claudeflare import NAME --mode max --tier 5`"
        )
    else:
        print_table(
            [
                {
                    "name": r["name"],
                    "provider": r["provider"],
                    "mode": r["mode"],
                    "tier": r["tier"],
                    "priority": r["priority"],
                    "state": r["state"],
                    "token_expires_at": describe_expiry(r["token_expires_at"]),
                    "requests_today": r["requests_today"],
                    **{window: used(r[f"utilization_{window}"], r[f"reset_{window}"]) for window in WINDOWS},
                    "extra": percent(r["utilization_extra"]),
                    "limited_until": r["limited_until"] or "-",
                    "reason": r["reason"] or "",
                }
                for r in rows
            ]
        )


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


WINDOWS = ("5h", "7d", "7d_opus", "7d_sonnet")  # utilization_X and reset_X in account_status


def used(fraction: float | None, reset: str | None, now: float | None = None) -> str:
    """A window's share used and when it resets: `42% (resets in 2h13m)`."""
    try:
        left = datetime.fromisoformat(reset).timestamp() - (time.time() if now is None else now)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        left = 0
    return percent(fraction) + (f" (resets in {duration(left)})" if fraction is not None and left > 0 else "")


def set_paused(obj: Context, name: str, paused: bool) -> None:
    manage.set_paused(obj.home, name, paused)  # a wrong name or file: Group says so in one line
    click.echo(f"{name} {'paused' if paused else 'resumed'}")


@cli.command()
@click.argument("name")
@pass_ctx
def pause(obj: Context, name: str) -> None:
    """Stop sending requests to an account."""
    set_paused(obj, name, True)


@cli.command()
@click.argument("name")
@pass_ctx
def resume(obj: Context, name: str) -> None:
    """Send requests to a paused account again."""
    set_paused(obj, name, False)


@cli.command()
@click.argument("name")
@yes_option
@pass_ctx
def remove(obj: Context, name: str, yes: bool) -> None:
    """Remove an account and its stored credentials."""
    if not yes:
        click.confirm(f"remove account {name} and its stored credentials?", abort=True)
    enrolment.remove_account(obj.home, name)
    click.echo(f"removed {name}")


@cli.command("set")
@click.argument("name")
@click.option("--tier", type=click.Choice([str(t) for t in TIERS]), help="Capacity weight: 1, 5 or 20.")
@click.option("--priority", type=PRIORITY, help="Lower is preferred.")
@pass_ctx
def set_(obj: Context, name: str, tier: str | None, priority: int | None) -> None:
    """Change an account's tier or priority."""
    if tier is None and priority is None:
        raise click.UsageError("give --tier and/or --priority")

    manage.set_tier_priority(obj.home, name, None if tier is None else int(tier), priority)
    click.echo(
        f"{name}: " + ", ".join(f"{k} {v}" for k, v in (("tier", tier), ("priority", priority)) if v is not None)
    )


@cli.command()
@click.argument("name", required=False, type=click.Choice(STRATEGIES))
@pass_ctx
def strategy(obj: Context, name: str | None) -> None:
    """Show the load-balancing strategy, or switch the running proxy to NAME."""
    if name is None:
        chosen = load_accounts_or_fail(obj.home).strategy
        click.echo(chosen or f"{default_strategy()} (proxy option; not set in accounts.toml)")
        return

    manage.set_strategy(obj.home, name)
    click.echo(f"strategy: {name}")


STATS_SINCE_FILE = "stats-since"
SINCE_RE = re.compile(r"^(\d+)([mhd])$")


def parse_since(value: str, now: datetime | None = None) -> str:
    """`30m`, `24h`, `7d` or an ISO date/time → an ISO UTC timestamp to compare started_at with."""
    now = now or datetime.now(UTC)
    try:
        if m := SINCE_RE.match(value.strip()):
            unit = {"m": 60, "h": 3600, "d": 86400}[m[2]]
            return (now - timedelta(seconds=int(m[1]) * unit)).strftime("%Y-%m-%dT%H:%M:%S")
        when = datetime.fromisoformat(value)
        if when.tzinfo is None:
            when = when.astimezone()  # a bare date is local time
        return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (ValueError, OverflowError):  # not a date, or one out of datetime's range (years 1-9999)
        raise click.BadParameter(f"{value!r}: use 30m, 24h, 7d or a date such as 2026-11-01") from None


@cli.command()
@click.option("--since", default="24h", show_default=True, help="Window: 30m, 24h, 7d or a date (local time).")
@json_option
@pass_ctx
def stats(obj: Context, since: str, as_json: bool) -> None:
    """Per account: requests, tokens, cost, errors and rate-limit state over a window.

    Example:

    \b
        claudeflare stats --since 7d
        claudeflare stats --since 2026-11-01 --json
    """
    start = parse_since(since)
    reset_file = obj.home / STATS_SINCE_FILE
    if reset_file.exists():
        start = max(start, reset_file.read_text().strip())  # `reset-stats` moved the start
    rows = per_account(obj.home / DB_FILE, start)
    clients = per_client(obj.home / DB_FILE, start)
    if as_json:
        click.echo(json.dumps({"since": start, "accounts": rows, "clients": clients}, indent=2))
    elif rows:
        click.echo(f"since {start}")
        print_table(
            [{**r, "cost_usd": f"{r['cost_usd'] or 0:.4f}", "limited_until": r["limited_until"] or "-"} for r in rows]
        )
        click.echo("")
        print_table([{**r, "cost_usd": f"{r['cost_usd'] or 0:.4f}"} for r in clients])
    else:
        click.echo(f"no requests since {start}")


@cli.command("reset-stats")
@pass_ctx
def reset_stats(obj: Context) -> None:
    """Start `stats` from now on, keeping the request history."""
    now = utc_now()
    (ensure_home(obj.home) / STATS_SINCE_FILE).write_text(now + "\n")
    click.echo(f"stats count from {now}")


@cli.command("clear-history")
@click.option("--before", help="Delete only requests before this date (local time), e.g. 2026-11-01; default: all.")
@yes_option
@pass_ctx
def clear_history(obj: Context, before: str | None, yes: bool) -> None:
    """Delete logged requests (all, or those before a date)."""
    cutoff = parse_since(before) if before else None
    what = f"requests logged before {cutoff}Z" if cutoff else "all logged requests"
    if not yes:
        click.confirm(f"delete {what}?", abort=True)
    path = obj.home / DB_FILE
    if not path.exists():
        click.echo("no history yet")
        return
    db = open_db(path)
    try:
        with db.conn:
            deleted = db.execute(
                "delete from requests where started_at < ?" if cutoff else "delete from requests",
                [cutoff] if cutoff else [],
            ).rowcount
    finally:
        db.close()
    click.echo(f"deleted {deleted} request(s)")


@cli.group("client-key")
def client_key() -> None:
    """Keys the proxy's own clients must present (required for clients beyond loopback), with optional limits."""


def limit_options(command):
    """The limits `client-key create` and `set` take (client_rules.py checks them)."""
    for option in reversed(
        [
            click.option("--budget-usd", type=float, help="Spend cap in USD at list price, per --per period (UTC)."),
            click.option(
                "--per", type=click.Choice(PERIODS), help="Budget period: day, week (from Monday) or month, in UTC."
            ),
            click.option("--rpm", type=int, help="Requests per minute (per UTC minute)."),
            click.option("--concurrency", type=int, help="Requests in flight at once."),
            click.option(
                "--models", help="Allowed models, glob patterns separated by commas (e.g. 'claude-sonnet-*')."
            ),
            click.option(
                "--expires", help="Expiry: an ISO date (its 00:00 UTC) or date and time (UTC unless it names a zone)."
            ),
        ]
    ):
        command = option(command)
    return command


CLEARS = {
    "budget": ("budget_usd", "per"),
    "rpm": ("rpm",),
    "concurrency": ("concurrency",),
    "models": ("models",),
    "expires": ("expires_at",),
}  # `client-key set --clear LIMIT`: the stored fields it removes


def with_limits(raw: dict, budget_usd, per, rpm, concurrency, models, expires, clear=()) -> dict:
    """`raw` (a key's stored limits) changed as the options say, checked; {} when none are left."""
    dropped = {field for limit in clear for field in CLEARS[limit]}
    changed = {k: v for k, v in raw.items() if k not in dropped}
    given = {
        "budget_usd": budget_usd,
        "per": per,
        "rpm": rpm,
        "concurrency": concurrency,
        "models": models,
        "expires_at": expires,
    }
    changed.update({k: v for k, v in given.items() if v is not None})
    try:
        return parse_limits(changed).to_json()
    except LimitsError as e:
        raise click.UsageError(str(e)) from None


def stored_key(data: dict, name: str) -> dict:
    if name not in data["client_keys"]:
        raise click.ClickException(f"no client key named {name!r} (see `claudeflare client-key list`)")
    return data["client_keys"][name]


@client_key.command("create")
@click.argument("name")
@limit_options
@pass_ctx
def client_key_create(obj: Context, name: str, **limits) -> None:
    """Create a client key; it is shown once and stored only as a hash.

    Example:

    \b
        claudeflare client-key create laptop > laptop.key
    """
    checked_name(name)
    checked = with_limits({}, **limits)
    key = "cfk-" + secrets.token_urlsafe(32)

    def change(data):
        if name in data["client_keys"]:
            raise click.ClickException(f"a client key named {name!r} already exists")
        entry = {"sha256": hash_client_key(key), "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        data["client_keys"][name] = {**entry, "limits": checked} if checked else entry

    obj.store().update(change)
    click.echo(key)
    click.echo(
        f"client key {name!r} created; clients send it as x-api-key (ANTHROPIC_API_KEY). It is not shown again.",
        err=True,
    )


@client_key.command("set")
@click.argument("name")
@limit_options
@click.option("--clear", multiple=True, type=click.Choice(list(CLEARS)), help="Remove a limit (repeat for several).")
@pass_ctx
def client_key_set(obj: Context, name: str, clear: tuple[str, ...], **limits) -> None:
    """Change a client key's limits; the running proxy applies them within a second."""

    def change(data):
        entry = stored_key(data, name)
        checked = with_limits(entry.get("limits") or {}, clear=clear, **limits)
        entry.pop("limits", None)
        if checked:
            entry["limits"] = checked

    obj.store().update(change)
    click.echo(f"client key {name!r} updated")


@client_key.command("list")
@json_option
@pass_ctx
def client_key_list(obj: Context, as_json: bool) -> None:
    """List client keys by name with their limits and spend this period (the keys themselves are not stored)."""
    keys = obj.store().read()["client_keys"]
    budgets = {n: parse_limits(k.get("limits")) for n, k in keys.items()}
    now = time.time()
    path = obj.home / DB_FILE
    spend = {n: query_readonly(path, SPEND_SQL, [n, start])[:1] for n, start in period_starts(budgets, now).items()}
    limits = {
        r["name"]: r for r in budget_rows(budgets, {n: r[0]["spend"] if r else 0.0 for n, r in spend.items()}, now)
    }
    rows = [{"created_at": k.get("created_at", ""), **limits[n]} for n, k in sorted(keys.items())]
    rows = [{"name": r.pop("name"), **r} for r in rows]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        print_table(
            [
                {
                    "name": r["name"],
                    "created_at": r["created_at"],
                    "spend": spend_text(r),
                    "rpm": r["rpm"] or "-",
                    "concurrency": r["concurrency"] or "-",
                    "models": r["models"] or "any",
                    "expires": r["expires_at"] or "-",
                }
                for r in rows
            ]
        )
    else:
        click.echo("no client keys: the proxy serves loopback clients without one")


def spend_text(row: dict) -> str:
    if row["budget_usd"] is None:
        return "-"
    return f"${row['spend_usd']:.2f} of ${row['budget_usd']:.2f}/{row['per']} (resets {row['resets_at']})"


@client_key.command("revoke")
@click.argument("name")
@pass_ctx
def client_key_revoke(obj: Context, name: str) -> None:
    """Delete a client key; clients using it are refused from then on."""

    def change(data):
        if data["client_keys"].pop(name, None) is None:
            raise click.ClickException(f"no client key named {name!r}")

    obj.store().update(change)
    click.echo(f"client key {name!r} revoked")


DASHBOARD_PLUGINS = Path(__file__).resolve().parent / "datasette_plugins"
DASHBOARD_PASSWORD_FILE = "dashboard-password-hash"
DASHBOARD_USER = "admin"  # datasette-auth-passwords: admin_password_hash in datasette-metadata.yml
PASSWORD_HASH_ENV = "CLAUDEFLARE_DASHBOARD_PASSWORD_HASH"
PUBLIC_ENV = "CLAUDEFLARE_DASHBOARD_PUBLIC"
HOME_ENV = "CLAUDEFLARE_HOME"


def dashboard_settings(allow_sql: bool = False) -> dict:
    """Datasette settings of the dashboard (also used by the tests, so they check what runs)."""
    return {
        "default_allow_sql": allow_sql,  # the SQL editor; the dashboard's own chart SQL runs regardless
        "sql_time_limit_ms": 5000,  # charts over 90 days of rows
        "max_returned_rows": 5000,
        "facet_time_limit_ms": 500,
    }


def dashboard_command(
    home: Path, host: str, port: int, metadata: Path, public: bool = False, allow_sql: bool = False
) -> tuple[list[str], dict[str, str]]:
    """The Datasette command line and environment. The password hash goes in the environment, never
    on the command line (which `ps` shows to everyone)."""
    args = [
        sys.executable,
        "-m",
        "datasette",
        "serve",
        str(home / DB_FILE),
        "--metadata",
        str(metadata),
        "--plugins-dir",
        str(DASHBOARD_PLUGINS),
        "--host",
        host,
        "--port",
        str(port),
    ]
    for name, value in dashboard_settings(allow_sql).items():
        args += ["--setting", name, ("on" if value else "off") if isinstance(value, bool) else str(value)]
    env = {k: v for k, v in os.environ.items() if k not in (PASSWORD_HASH_ENV, PUBLIC_ENV)}
    password_hash = read_password_hash(home)
    if password_hash:
        env[PASSWORD_HASH_ENV] = password_hash
    env[PUBLIC_ENV] = "1" if public else "0"
    env[HOME_ENV] = str(home)  # the accounts page manages this home's accounts
    return args, env


def read_password_hash(home: Path) -> str | None:
    try:
        value = (home / DASHBOARD_PASSWORD_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return value or None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="Port to listen on.")
@click.option(
    "--metadata",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=str(METADATA),
    show_default=True,
    help="Datasette metadata (charts and canned queries).",
)
@click.option(
    "--public",
    is_flag=True,
    help="Let anyone who can reach the port read the dashboard (management still needs the login).",
)
@click.option("--allow-sql", is_flag=True, help="Enable Datasette's SQL editor for those who may read.")
@pass_ctx
def dashboard(obj: Context, host: str, port: int, metadata: Path, public: bool, allow_sql: bool) -> None:
    """Serve the analytics dashboard (Datasette) over the live flow log.

    Log in as "admin" with the password set by `claudeflare dashboard-password`.
    """
    home = ensure_home(obj.home)
    open_db(home / DB_FILE).close()  # create and migrate, so the dashboard has its tables before the first request
    args, env = dashboard_command(home, host, port, metadata, public, allow_sql)
    url = f"http://{host}:{port}/"
    if PASSWORD_HASH_ENV not in env:
        click.echo(
            f"claudeflare dashboard: {url} — no password set yet: run `claudeflare dashboard-password` "
            f"to log in{' and manage' if public else ''}, then restart the dashboard",
            err=True,
        )
    else:
        click.echo(f"claudeflare dashboard: {url} (log in as {DASHBOARD_USER})", err=True)
    os.execve(sys.executable, args, env)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--workers", type=click.IntRange(1, 256), default=1, show_default=True, help="mitmdump processes (one core each)."
)
@click.option("--listen-host", default="127.0.0.1", show_default=True, help="Interface to listen on ('' for all).")
@click.option(
    "--listen-port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on (0: a free one).",
)
@click.argument("mitmdump_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- MITMDUMP ARGS...]")
@pass_ctx
def serve(obj: Context, workers: int, listen_host: str, listen_port: int, mitmdump_args: tuple[str, ...]) -> None:
    """Run the proxy as N mitmdump workers sharing one port (SO_REUSEPORT), restarting any that dies.

    Arguments after -- go to every worker. SIGTERM or Ctrl-C stops them all once their rows are written.

    \b
        claudeflare serve --workers 4 -- --set claudeflare_strategy=round-robin
    """
    env = {**os.environ, HOME_ENV: str(ensure_home(obj.home))}  # the workers serve this home
    try:
        code = supervisor.serve(
            workers, listen_host, listen_port, list(mitmdump_args), env, say=lambda line: click.echo(line, err=True)
        )
    except supervisor.ServeError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)


@cli.command("dashboard-password")
@pass_ctx
def dashboard_password(obj: Context) -> None:
    """Set the dashboard's login password (user "admin"), from a hidden prompt or standard input.

    Only a salted PBKDF2 hash is stored, in dashboard-password-hash (mode 0600) in the home folder;
    restart `claudeflare dashboard` to use it.
    """
    from datasette_auth_passwords.utils import hash_password

    if sys.stdin.isatty():
        password = click.prompt("Dashboard password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise click.ClickException("the password needs at least 8 characters")
    home = ensure_home(obj.home)
    path = home / DASHBOARD_PASSWORD_FILE
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(hash_password(password) + "\n")
    os.replace(tmp, path)
    click.echo(f"dashboard password set (user {DASHBOARD_USER}); restart `claudeflare dashboard` to use it")


@cli.command()
@pass_ctx
def tui(obj: Context) -> None:
    """Watch and steer the pool in a terminal UI (keys in its footer); works beside a running proxy."""
    from .tui import run  # Textual loads only for this command

    run(obj.home)


@cli.group("alerts")
def alerts_group() -> None:
    """Webhook alerts: the [alerts] table of accounts.toml."""


@alerts_group.command("test")
@click.option(
    "--event",
    type=click.Choice(alerts.EVENTS),
    default="limited",
    show_default=True,
    help="Which kind of sample to send.",
)
@pass_ctx
def alerts_test(obj: Context, event: str) -> None:
    """Post a sample alert to the [alerts] url now, and say whether the receiver took it."""
    config = load_accounts_or_fail(obj.home).alerts
    if config is None:
        raise click.ClickException(
            f'no [alerts] table in {obj.home / ACCOUNTS_FILE}: add one with url = "https://…" (see accounts.example.toml)'
        )
    sample = alerts.sample(event)
    body = alerts.payload(config, event, sample.message, sample.account, **sample.fields)
    why = alerts.deliver(config, body)  # the URL is a secret: only its host is shown
    if why:
        raise click.ClickException(f"the {event!r} sample to {config.host} was not delivered: {why}")
    click.echo(f"sent a sample {event!r} alert to {config.host} ({config.format} format)")


def main() -> None:
    cli(prog_name="claudeflare")
