"""Datasette plugin for the Claudeflare dashboard, loaded by `claudeflare dashboard` (--plugins-dir).

- The dashboard's charts fetch their data as `/<db>.json?sql=…`, which Datasette only serves with the
  execute-sql permission. SQL editing is off by default, so this plugin grants execute-sql for exactly
  the SQL of the charts configured under `plugins: datasette-dashboards:` (each variant that the
  dashboard's filters can produce) and for the dashboard pages, to whoever may view the database.
  Any other SQL stays refused.
- `plugins: claudeflare: public: true` (set by `claudeflare dashboard --public`) lets anonymous
  visitors read; management (the writable canned queries) still needs a login.
- Anonymous visitors refused a page are sent to the login form; `/` opens the dashboard.
- The management forms (writable canned queries) show their title and description.
- Chart data is escaped here, in one place: datasette-dashboards puts table and metric cells into the
  page with `innerHTML`, and cells hold what clients sent (model, error…). Every string in the JSON
  of those charts is HTML-escaped, except what the SQL function `html(template, value…)` made:
  its template is markup, its values are escaped (see `html`).
"""

import contextvars
import itertools
import json
import re
import secrets
from urllib.parse import parse_qs

from datasette import hookimpl
from datasette.utils.asgi import Response
from datasette_dashboards import replace_opts_in_query, sql_opt_pattern, sql_var_pattern
from markupsafe import escape

PLUGIN = "claudeflare"
DASHBOARD_PAGE = re.compile(r"^/-/dashboards/[^/]+(/[^/]+)?(/embed)?$")

# The HTTP request being served, for permission checks (Datasette's hook does not receive it).
current_scope: contextvars.ContextVar[dict | None] = contextvars.ContextVar("claudeflare_scope", default=None)


def config(datasette) -> dict:
    return datasette.plugin_config(PLUGIN) or {}


def is_public(datasette) -> bool:
    value = config(datasette).get("public")
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


def query_variants(sql: str) -> set[str]:
    """Every SQL text the dashboard sends for a chart: each `[[ … :var … ]]` block kept or dropped."""
    names = sorted(
        {m.group("var") for block in sql_opt_pattern.findall(sql) for m in [sql_var_pattern.search(block)] if m}
    )
    variants = set()
    for kept in itertools.product((False, True), repeat=len(names)):
        options = {name: "x" if keep else "" for name, keep in zip(names, kept, strict=True)}
        variants.add(replace_opts_in_query(sql, options))
    return variants


def chart_queries(datasette, database: str, escaped_only: bool = False) -> set[str]:
    """The SQL the dashboard's charts send; with `escaped_only`, of those drawn as HTML."""
    dashboards = datasette.plugin_config("datasette-dashboards") or {}
    allowed = set()
    for dashboard in dashboards.values():
        for chart in (dashboard.get("charts") or {}).values():
            if escaped_only and chart.get("library") in SVG_LIBRARIES:
                continue
            if chart.get("db") == database and chart.get("query"):
                allowed |= query_variants(chart["query"])
    return allowed


# --- escaping chart data -------------------------------------------------------------------------
# Vega draws text as SVG text (and escapes its tooltips); every other library, present or future,
# gets its data escaped.
SVG_LIBRARIES = {"vega", "vega-lite"}
# Wraps the output of html(): unguessable (fresh per process, never sent), so no data can forge it.
MARK = "\ue000" + secrets.token_hex(16) + "\ue000"


def is_markup(value) -> bool:
    return (
        isinstance(value, str)
        and len(value) >= 2 * len(MARK)
        and value.startswith(MARK)
        and value.endswith(MARK)
        and value.count(MARK) == 2
    )


def as_html(value) -> str:
    """A cell as HTML: html()'s output as made, anything else escaped."""
    if is_markup(value):
        return value[len(MARK) : -len(MARK)]
    return str(escape("" if value is None else str(value).replace(MARK, "")))


def html(template, *values) -> str:
    """SQL `html('<a href="/x/{}">{}</a>', id, label)`: the template (a literal in the chart's SQL)
    is kept as markup, each `{}` takes the next value escaped (or an html() result as it is)."""
    parts = str(template).split("{}")
    if len(parts) != len(values) + 1:
        raise ValueError(f"html(): {len(parts) - 1} placeholder(s) for {len(values)} value(s)")
    out = [parts[0]]
    for value, part in zip(values, parts[1:], strict=True):
        out += [as_html(value), part]
    return MARK + "".join(out) + MARK


def escape_json(data):
    """Every string in a chart's JSON answer (keys too) as safe HTML."""
    if isinstance(data, str):
        return as_html(data)
    if isinstance(data, list):
        return [escape_json(v) for v in data]
    if isinstance(data, dict):
        return {as_html(k): escape_json(v) for k, v in data.items()}
    return data


def drawn_as_html(datasette, scope: dict) -> bool:
    """A request for the data of a chart that the dashboard renders with innerHTML."""
    path = scope.get("path", "")
    if scope.get("type") != "http" or not (path.startswith("/") and path.endswith(".json")):
        return False
    sql = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("sql") or []
    queries = chart_queries(datasette, path[1 : -len(".json")], escaped_only=True)
    return any(q in queries for q in sql)


async def send_escaped(send, messages: list[dict]) -> None:
    start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
    if start.get("status") != 200:  # a refusal or an error page: no chart data in it
        for message in messages:
            await send(message)
        return
    try:
        body = json.dumps(escape_json(json.loads(body)), ensure_ascii=False).encode()
    except ValueError:  # not one JSON document (e.g. `_nl=on`): nothing unescaped may go out
        start = {**start, "status": 400}
        body = json.dumps({"ok": False, "error": "chart data must be plain JSON", "status": 400}).encode()
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@hookimpl
def prepare_connection(conn):
    conn.create_function("html", -1, html, deterministic=True)


def is_chart_request(datasette, scope: dict | None, database) -> bool:
    if not scope or scope.get("type") != "http" or not isinstance(database, str):
        return False
    path = scope.get("path", "")
    if DASHBOARD_PAGE.match(path):
        return True
    if path != f"/{database}.json":
        return False
    sql = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("sql")
    return bool(sql) and len(sql) == 1 and sql[0] in chart_queries(datasette, database)


@hookimpl
def asgi_wrapper(datasette):
    def wrap(app):
        async def remember_scope(scope, receive, send):
            token = current_scope.set(scope)
            try:
                if drawn_as_html(datasette, scope):
                    await app(scope, receive, escaping(send))
                else:
                    await app(scope, receive, send)
            finally:
                current_scope.reset(token)

        def escaping(send):
            messages = []

            async def buffered(message):
                messages.append(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    await send_escaped(send, messages)

            return buffered

        return remember_scope

    return wrap


def public_read(datasette, action: str, resource) -> bool:
    """With `public`, reading is allowed to anonymous visitors (the metadata's `allow` asks for a login)."""
    if not is_public(datasette):
        return False
    if action == "view-instance":
        return True
    if action == "view-database":
        return resource != "_internal"
    if action == "view-table":
        return resource[0] != "_internal"
    if action == "view-query":
        database, name = resource
        query = ((datasette.metadata("queries", database=database, fallback=False) or {}).get(name)) or {}
        return not query.get("write")  # management keeps its own `allow`
    return False


@hookimpl(trylast=True)
def permission_allowed(datasette, actor, action, resource):
    if actor is None and public_read(datasette, action, resource):
        return True
    if action == "execute-sql" and is_chart_request(datasette, current_scope.get(), resource):

        async def may_view():
            return await datasette.permission_allowed(
                actor, "view-instance", default=True
            ) and await datasette.permission_allowed(actor, "view-database", resource, default=True)

        return may_view
    return None


@hookimpl
def forbidden(datasette, request, message):
    # Visitors who are not logged in get the login form instead of a bare 403 on pages.
    if request.actor is None and request.method == "GET" and not request.path.endswith(".json"):
        return Response.redirect(datasette.urls.path("/-/login"))
    return None


@hookimpl
def extra_template_vars(template, database, request, datasette):
    # Datasette 0.65 renders a writable canned query's form without its title and description.
    name = (request.url_vars or {}).get("table") if request is not None else None
    if template != "query.html" or not database or not name:
        return {}

    async def title_and_description():
        query = await datasette.get_canned_query(database, name, request.actor)
        return {"metadata": query} if query and query.get("write") else {}

    return title_and_description


@hookimpl
def register_routes(datasette):
    slug = config(datasette).get("home_dashboard")
    if not slug:
        return []

    async def home(request, datasette):
        return Response.redirect(datasette.urls.path(f"/-/dashboards/{slug}"))

    return [(r"^/$", home)]
