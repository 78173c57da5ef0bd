"""Datasette plugin: add and remove the pool's accounts from the browser (`/-/claudeflare/accounts`).

The same library functions as `claudeflare add/remove` (claudeflare/enrol.py), on the home folder
`claudeflare dashboard` names in the environment (CLAUDEFLARE_HOME). For logged-in users only, even
with `--public`. Every change is a POST carrying Datasette's CSRF token (asgi-csrf checks it for
plugin routes too) and a body under the login plugin's cap. Secrets travel only in POST bodies: they
are never put back into a page (a form shown again after an error has its key field empty), a URL
or a message. An OAuth log-in's PKCE verifier stays in this process, in `PendingLogins`, under a
random id that the page carries; the id is worth nothing to another user or after 10 minutes.
File locks and the token URL are reached from a worker thread, never on the event loop. Pages are
Jinja templates under Datasette's autoescaping: every value from the files or the form is escaped there.
"""

import asyncio
import secrets
import time
import weakref
from dataclasses import dataclass

from datasette import hookimpl
from datasette.utils.asgi import Response

from claudeflare import oauth
from claudeflare.accounts import TIERS, Account, AccountsError, load_pool
from claudeflare.config import resolve_home
from claudeflare.credentials import CredentialStoreError
from claudeflare.enrol import (
    OAUTH_MODES,
    add_api_key_account,
    finish_oauth,
    finish_relogin,
    new_account,
    oauth_account,
    refuse_duplicate,
    remove_account,
    start_oauth,
)
from claudeflare.oauth import LoginFlow, OAuthError

PAGE = "/-/claudeflare/accounts"
MAX_PENDING = 32  # log-ins in progress at once, per dashboard
REFUSED = (ValueError, OAuthError, CredentialStoreError)  # AccountsError and HomeError are ValueErrors


@dataclass(frozen=True)
class Pending:
    flow: LoginFlow
    account: Account
    actor_id: str
    url: str
    relogin: bool  # an existing account's new log-in, not a new account


class PendingLogins:
    """OAuth log-ins between the link and the pasted code, by a random id; each lives FLOW_LIFETIME."""

    def __init__(self) -> None:
        self.logins: dict[str, Pending] = {}

    def prune(self, now: float) -> None:
        self.logins = {k: p for k, p in self.logins.items() if now - p.flow.started <= oauth.FLOW_LIFETIME}

    def add(self, pending: Pending) -> str:
        self.prune(time.time())
        if len(self.logins) >= MAX_PENDING:
            raise AccountsError("too many log-ins in progress: finish one, or wait 10 minutes")
        key = secrets.token_urlsafe(32)
        self.logins[key] = pending
        return key

    def take(self, key: str, actor_id: str) -> Pending:
        """The log-in, out of the store: a second paste sent meanwhile finds nothing."""
        self.prune(time.time())
        pending = self.logins.get(key)
        if pending is None or pending.actor_id != actor_id:
            raise AccountsError("this log-in has expired or was finished: start it again")
        return self.logins.pop(key)

    def put_back(self, key: str, pending: Pending) -> None:
        self.logins[key] = pending


pending_logins: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per Datasette instance


async def in_home(function, *args):
    """`function(home, *args)` in a worker thread, on the home `claudeflare dashboard` set in CLAUDEFLARE_HOME."""
    return await asyncio.to_thread(lambda: function(resolve_home(None), *args))


def account_rows(home) -> tuple[list[dict], str | None]:
    try:
        pool = load_pool(home)
    except REFUSED as e:
        return [], str(e)
    return [
        {
            "name": a.name,
            "mode": a.mode,
            "tier": a.tier,
            "priority": a.priority,
            "state": pool.state(a),
            "oauth": a.oauth,
        }
        for a in pool.accounts
    ], None


def form_account(form: dict, mode: str) -> Account:
    try:
        tier, priority = int(form.get("tier") or 1), int(form.get("priority") or 0)
    except ValueError:
        raise AccountsError("tier and priority must be whole numbers") from None
    return new_account(form.get("name", "").strip(), mode, tier, priority)


# --- pages ----------------------------------------------------------------------------------------

TEMPLATE = """{% extends "base.html" %}
{% block title %}Accounts{% endblock %}
{% block content %}
<h1>Accounts</h1>
{% if error %}<p class="message-error">{{ error }}</p>{% endif %}
{% macro tiers(selected) %}<select name="tier">{% for t in tier_choices %}
  <option value="{{ t }}"{% if t|string == selected|string %} selected{% endif %}>{{ t }}</option>{% endfor %}
</select>{% endmacro %}
{% if view == "oauth" %}
<p>Open this link, log in {% if relogin %}again {% endif %}as the account <strong>{{ name }}</strong> ({{ mode }}), then paste the code the page shows:</p>
<p><a id="authorize" href="{{ url }}" target="_blank" rel="noopener noreferrer">{{ url }}</a></p>
<form method="post" action="{{ page }}/oauth/finish" class="oauth-finish">
  <input type="hidden" name="csrftoken" value="{{ csrftoken() }}">
  <input type="hidden" name="login" value="{{ login }}">
  <label>Code (CODE#STATE) <input type="password" name="code" autocomplete="off" required></label>
  <input type="submit" value="{{ 'Log in' if relogin else 'Add the account' }}">
</form>
<p><a href="{{ page }}">Cancel</a></p>
{% elif view == "remove" %}
<p>Remove the account <strong>{{ name }}</strong> and its stored credentials?</p>
<form method="post" action="{{ page }}/remove" class="remove-confirm">
  <input type="hidden" name="csrftoken" value="{{ csrftoken() }}">
  <input type="hidden" name="name" value="{{ name }}">
  <input type="hidden" name="confirm" value="yes">
  <input type="submit" value="Remove {{ name }}">
</form>
<p><a href="{{ page }}">Cancel</a></p>
{% else %}
{% if list_error %}<p class="message-error">{{ list_error }}</p>{% endif %}
<table class="rows-and-columns accounts">
  <thead><tr><th>name</th><th>mode</th><th>tier</th><th>priority</th><th>state</th><th></th></tr></thead>
  <tbody>{% for a in accounts %}
  <tr data-account="{{ a.name }}"><td>{{ a.name }}</td><td>{{ a.mode }}</td><td>{{ a.tier }}</td><td>{{ a.priority }}</td><td>{{ a.state }}</td>
    <td>{% if a.oauth %}<form method="post" action="{{ page }}/oauth/start" class="relogin">
      <input type="hidden" name="csrftoken" value="{{ csrftoken() }}">
      <input type="hidden" name="relogin" value="{{ a.name }}">
      <input type="submit" value="Log in again"></form>{% endif %}
    <form method="post" action="{{ page }}/remove" class="remove">
      <input type="hidden" name="csrftoken" value="{{ csrftoken() }}">
      <input type="hidden" name="name" value="{{ a.name }}">
      <input type="submit" value="Remove…"></form></td></tr>{% else %}
  <tr><td colspan="6">no accounts yet</td></tr>{% endfor %}
  </tbody>
</table>
<h2>Add an API key</h2>
<form method="post" action="{{ page }}/add-key" class="add-key">
  <input type="hidden" name="csrftoken" value="{{ csrftoken() }}">
  <p><label>Name <input name="name" value="{{ form.name if form_kind == 'key' else '' }}" required></label>
  <label>Tier {{ tiers(form.tier if form_kind == 'key' else 1) }}</label>
  <label>Priority <input name="priority" type="number" value="{{ form.priority if form_kind == 'key' else 0 }}"></label></p>
  <p><label>API key <input name="key" type="password" autocomplete="off" required></label>
  <input type="submit" value="Add"></p>
</form>
<h2>Log in with OAuth</h2>
<p>A Pro/Max subscription (<em>max</em>), or a Console log-in that mints an API key (<em>console</em>).</p>
<form method="post" action="{{ page }}/oauth/start" class="oauth-start">
  <input type="hidden" name="csrftoken" value="{{ csrftoken() }}">
  <p><label>Name <input name="name" value="{{ form.name if form_kind == 'oauth' else '' }}" required></label>
  <label>Mode <select name="mode">{% for m in oauth_modes %}<option value="{{ m }}"{% if form_kind == 'oauth' and form.mode == m %} selected{% endif %}>{{ m }}</option>{% endfor %}</select></label>
  <label>Tier {{ tiers(form.tier if form_kind == 'oauth' else 5) }}</label>
  <label>Priority <input name="priority" type="number" value="{{ form.priority if form_kind == 'oauth' else 0 }}"></label>
  <input type="submit" value="Get the log-in link"></p>
</form>
{% endif %}
{% endblock %}
"""


async def render(datasette, request, status: int = 200, view: str = "list", **context) -> Response:
    if view == "list":
        context["accounts"], context["list_error"] = await in_home(account_rows)
    template = datasette.jinja_env.from_string(TEMPLATE)
    context = {
        "page": datasette.urls.path(PAGE),
        "tier_choices": TIERS,
        "oauth_modes": OAUTH_MODES,
        "form": {},
        "form_kind": None,
        "view": view,
        **context,
    }
    return Response.html(await datasette.render_template(template, context, request=request), status=status)


def done(datasette, request, message: str) -> Response:
    datasette.add_message(request, message, datasette.INFO)
    return Response.redirect(datasette.urls.path(PAGE))


def refused(datasette, request) -> Response | None:
    """Managing accounts needs a login, whatever `--public` allows."""
    if request.actor is not None:
        return None
    if request.method == "GET":
        return Response.redirect(datasette.urls.path("/-/login"))
    return Response.text("Log in to manage accounts.", status=403)


def without_secrets(form: dict) -> dict:
    return {k: v for k, v in form.items() if k in ("name", "mode", "tier", "priority")}


async def accounts_page(request, datasette):
    if response := refused(datasette, request):
        return response
    if request.method != "GET":
        return Response.text("Method not allowed", status=405)
    return await render(datasette, request)


async def add_key(request, datasette):
    if response := refused(datasette, request) or post_only(request):
        return response
    form = await request.post_vars()
    try:
        account = form_account(form, "api-key")
        await in_home(add_api_key_account, account, form.get("key", ""))
    except REFUSED as e:
        return await render(datasette, request, 400, error=str(e), form=without_secrets(form), form_kind="key")
    return done(datasette, request, f"added {account.name} (api-key, tier {account.tier})")


async def oauth_start(request, datasette):
    if response := refused(datasette, request) or post_only(request):
        return response
    form = await request.post_vars()
    relogin = "relogin" in form
    try:
        if relogin:
            account = await in_home(oauth_account, form["relogin"])
        else:
            account = form_account(form, form.get("mode", ""))
            await in_home(refuse_duplicate, account.name)  # before the person logs in
        flow, url = start_oauth(account.mode)
        pending = Pending(flow, account, request.actor.get("id"), url, relogin)
        login = logins(datasette).add(pending)
    except REFUSED as e:
        return await render(datasette, request, 400, error=str(e), form=without_secrets(form), form_kind="oauth")
    return await render(datasette, request, view="oauth", **oauth_page(login, pending))


def oauth_page(login: str, pending: Pending) -> dict:
    return {
        "url": pending.url,
        "login": login,
        "name": pending.account.name,
        "mode": pending.account.mode,
        "relogin": pending.relogin,
    }


async def oauth_finish(request, datasette):
    if response := refused(datasette, request) or post_only(request):
        return response
    form = await request.post_vars()
    key, store = form.get("login", ""), logins(datasette)
    try:
        pending = store.take(key, request.actor.get("id"))
        await in_home(
            finish_relogin if pending.relogin else finish_oauth, pending.account, pending.flow, form.get("code", "")
        )
    except OAuthError as e:
        if e.kind != "state":  # the code was spent or the flow is over: only a fresh link helps
            return await render(datasette, request, 400, error=f"{e} (start the log-in again)")
        store.put_back(key, pending)  # a mistyped paste: the same link still works
        return await render(datasette, request, 400, view="oauth", error=str(e), **oauth_page(key, pending))
    except REFUSED as e:
        return await render(datasette, request, 400, error=str(e))
    account = pending.account
    if pending.relogin:
        return done(datasette, request, f"logged in {account.name}")
    return done(datasette, request, f"added {account.name} ({account.mode}, tier {account.tier})")


async def remove(request, datasette):
    if response := refused(datasette, request) or post_only(request):
        return response
    form = await request.post_vars()
    name = form.get("name", "")
    if form.get("confirm") != "yes":
        return await render(datasette, request, view="remove", name=name)
    try:
        await in_home(remove_account, name)
    except REFUSED as e:
        return await render(datasette, request, 400, error=str(e))
    return done(datasette, request, f"removed {name}")


def post_only(request) -> Response | None:
    return None if request.method == "POST" else Response.text("Method not allowed", status=405)


def logins(datasette) -> PendingLogins:
    return pending_logins.setdefault(datasette, PendingLogins())


@hookimpl
def register_routes(datasette):
    return [
        (rf"^{PAGE}$", accounts_page),
        (rf"^{PAGE}/add-key$", add_key),
        (rf"^{PAGE}/oauth/start$", oauth_start),
        (rf"^{PAGE}/oauth/finish$", oauth_finish),
        (rf"^{PAGE}/remove$", remove),
    ]


@hookimpl
def menu_links(datasette, actor):
    return [{"href": datasette.urls.path(PAGE), "label": "Accounts"}] if actor else []
