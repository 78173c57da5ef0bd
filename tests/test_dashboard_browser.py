"""The dashboard in a real headless Chromium, over a flow log filled by real proxied traffic.

Starts the proxy (mitmdump with the addon) against the fake Anthropic upstream, sends requests
through it, starts `claudeflare dashboard` as `scripts/run` does, logs in through the login form,
waits for every chart to draw, checks that nothing failed in the page, and saves a screenshot to
tests/artifacts/dashboard.png. Chromium is driven over the DevTools protocol (aiohttp's WebSocket).
"""

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import requests
import yaml
from click.testing import CliRunner

from claudeflare.accounts import load_accounts
from claudeflare.cli import cli
from claudeflare.credentials import CredentialStore
from claudeflare.flowlog import query_readonly

from harness import CLAUDE_CODE_SYSTEM, add_account, db_rows, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CLAUDEFLARE = Path(sys.executable).parent / "claudeflare"
PASSWORD = "a dashboard password"
SONNET, HAIKU = "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001"
XSS = '<img src=x onerror="window.scripted=1">'  # a client's model, shown in "Latest failures"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1500,1200",
    "--hide-scrollbars",
]

if not Path(CHROMIUM).exists():
    raise RuntimeError(f"{CHROMIUM} is missing: scripts/setup installs Debian's chromium")


# --- traffic --------------------------------------------------------------------------------------


def oauth_accounts(fake, home, *specs):
    for name, tier in specs:
        access, refresh = f"sk-ant-oat01-{name}-access", f"sk-ant-ort01-{name}-refresh"
        fake.add_oauth(account=name, access_token=access, refresh_token=refresh, expires_in=7200)
        add_account(home, name, "max", tier, access_token=access, refresh_token=refresh, expires_at=time.time() + 7200)


def ask(proxy, session, model=SONNET, stream=False, tokens=40, cache_read=0, cache_write=0, fault=None):
    headers = {
        "x-claude-code-session-id": session,
        "x-fake-tokens": str(tokens),
        "x-fake-cache-read": str(cache_read),
        "x-fake-cache-write": str(cache_write),
    }
    if fault:
        headers["x-fake-fault"] = fault
    body = {
        "model": model,
        "max_tokens": 200,
        "stream": stream,
        "system": CLAUDE_CODE_SYSTEM,
        "messages": [{"role": "user", "content": f"hi from {session}"}],
    }
    reply = requests.post(f"{proxy.url}/v1/messages", json=body, headers=headers, timeout=30)
    _ = reply.content  # read streams to the end
    return reply.status_code


def send_traffic(fake, proxy) -> int:
    sent = 0
    for i in range(6):  # conversations, each with a cache write then reads
        session = f"conversation-{i}"
        model = HAIKU if i % 3 == 2 else SONNET
        for turn in range(3):
            ask(
                proxy,
                session,
                model=model,
                stream=turn % 2 == 0,
                tokens=20 + 15 * turn,
                cache_write=2000 if turn == 0 else 0,
                cache_read=0 if turn == 0 else 2000 * turn,
            )
            sent += 1
    fake.set_fault("*", "status:429-windowless", 1)  # one failover to the other account
    ask(proxy, "conversation-0", cache_read=6000)
    ask(proxy, "conversation-x", model=XSS, fault="status:400")  # an error the client sees, its model script
    return sent + 2


# --- Chromium over the DevTools protocol -----------------------------------------------------------


class Page:
    """One page target: commands, and the events (console, exceptions, network) seen meanwhile."""

    def __init__(self, ws):
        self.ws = ws
        self.last_id = 0
        self.events: list[dict] = []

    async def send(self, method: str, **params) -> dict:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=30)
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    async def eval(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {what or expression}")
            await asyncio.sleep(0.2)

    def problems(self) -> list[str]:
        found = []
        for e in self.events:
            method, params = e["method"], e.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(
                    f"exception: {params['exceptionDetails'].get('exception', {}).get('description') or params['exceptionDetails']}"
                )
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(
                    f"console.{params['type']}: {[a.get('value', a.get('description')) for a in params.get('args', [])]}"
                )
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
                found.append(f"HTTP {params['response']['status']}: {params['response']['url']}")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                found.append(f"load failed: {params.get('errorText')}")
        return found

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]


async def open_page(port: int) -> tuple[aiohttp.ClientSession, Page]:
    session = aiohttp.ClientSession()
    async with session.get(f"http://127.0.0.1:{port}/json/list") as reply:
        targets = await reply.json()
    target = next(t for t in targets if t["type"] == "page")
    ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
    page = Page(ws)
    for domain in ("Page", "Runtime", "Log", "Network"):
        await page.send(f"{domain}.enable")
    return session, page


def start_chromium(user_data: Path, log: Path) -> tuple[subprocess.Popen, int]:
    user_data.mkdir()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", "about:blank"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    port_file = user_data / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"chromium did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    return proc, int(port_file.read_text().split()[0])


CHART_STATE = """(() => [...document.querySelectorAll('.dashboard-card-chart')].map(el => ({
  id: el.id.replace('chart-', ''),
  marks: el.querySelectorAll('canvas, svg.marks').length,
  // data marks: SVG items outside axes and legends, or ink on a canvas (vega-embed can render either)
  symbols: [...el.querySelectorAll('svg.marks [role=graphics-symbol]')].filter(e => !e.closest('.role-legend, .role-axis')).length,
  inked: [...el.querySelectorAll('canvas')].some(c => {
    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
    return n > 500;
  }),
  rows: el.querySelectorAll('tr').length,
  text: el.innerText.trim(),
})))()"""


# --- the test -------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_dashboard_draws_every_chart_over_real_traffic(fake, home, start_proxy, tmp_path):
    oauth_accounts(fake, home, ("alpha", 5), ("beta", 5))
    for name in ("alpha", "beta"):
        fake.set_limit(name, requests=60, window_s=5 * 3600)
    proxy = start_proxy(home, "--set", "claudeflare_retry_delay_ms=50")
    sent = send_traffic(fake, proxy)
    rows = db_rows(home, expect=sent)
    assert len(rows) == sent

    with dashboard_and_chromium(home, tmp_path) as (base, devtools_port):
        charts = asyncio.run(drive(devtools_port, base, sent, home))
    assert {c["id"] for c in charts} >= {
        "requests-per-minute",
        "tokens-over-time",
        "cost-per-day",
        "error-rate",
        "ttfb",
        "duration",
        "cache-by-account",
        "cache-by-session",
        "health",
        "utilization",
        "failures",
        "client-split",
    }


@contextlib.contextmanager
def dashboard_and_chromium(home: Path, tmp_path: Path):
    """`claudeflare dashboard` with a password set, as `scripts/run` starts it, and a headless Chromium:
    (the dashboard's URL, Chromium's DevTools port)."""
    result = CliRunner().invoke(cli, ["--home", str(home), "dashboard-password"], input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    port = free_port()
    with open(tmp_path / "dashboard.log", "wb") as out:
        dashboard = subprocess.Popen(
            [str(CLAUDEFLARE), "--home", str(home), "dashboard", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    chromium = None
    try:
        wait_for_port(port, 30, alive=lambda: dashboard.poll() is None)
        chromium, devtools_port = start_chromium(tmp_path / "chromium-profile", tmp_path / "chromium.log")
        yield f"http://127.0.0.1:{port}", devtools_port
    finally:
        for proc in (chromium, dashboard):
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def log_in(page: Page, base: str, path: str = "/") -> None:
    """Anonymous, `path` leads to the login form; fill it in."""
    await page.send("Page.navigate", url=base + path)
    await page.wait_for("location.pathname === '/-/login' && document.readyState === 'complete'", what="the login page")
    await page.eval(f"""(() => {{
        document.querySelector('#id_username').value = 'admin';
        document.querySelector('#id_password').value = {json.dumps(PASSWORD)};
        document.querySelector('form.password-login').submit();
    }})()""")


async def drive(devtools_port: int, base: str, sent: int, home: Path) -> list[dict]:
    session, page = await open_page(devtools_port)
    try:
        await log_in(page, base)
        await page.wait_for(
            "location.pathname === '/-/dashboards/pool' && document.readyState === 'complete'",
            what="the dashboard after logging in",
        )
        assert await page.eval("new URLSearchParams(location.search).get('range')") == "24 hours"

        vega_charts = await page.eval("[...document.querySelectorAll('.dashboard-card-chart')].length")
        assert vega_charts >= 14

        def drawn(charts):
            kinds = {c["id"]: c for c in charts}
            return (
                all(c["marks"] for k, c in kinds.items() if k not in METRICS | TABLES | TEXT)
                and all(c["text"] for k, c in kinds.items() if k in METRICS)
                and all(c["rows"] >= 2 for k, c in kinds.items() if k in TABLES)
            )

        deadline = time.monotonic() + 45
        while not drawn(charts := await page.eval(CHART_STATE)):
            assert time.monotonic() < deadline, f"charts not drawn: {charts}"
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)  # let the last canvases paint
        charts = await page.eval(CHART_STATE)
        by_id = {c["id"]: c for c in charts}

        blank = [c["id"] for c in charts if c["id"] not in METRICS | TABLES | TEXT and not (c["symbols"] or c["inked"])]
        assert not blank, f"charts that drew no data: {blank}"
        assert by_id["requests-per-minute"]["symbols"] >= 96  # a bar per account and 15-minute bucket
        assert by_id["requests"]["text"] == str(sent)
        assert "alpha" in by_id["health"]["text"] and "beta" in by_id["health"]["text"]
        assert "400" in by_id["failures"]["text"]
        assert XSS in by_id["failures"]["text"]  # shown as text…
        assert await page.eval(
            "window.scripted === undefined && !document.querySelector('.dashboard-card-chart img')"
        )  # …never run
        assert not page.problems(), page.problems()
        outside = [u for u in page.requested() if not u.startswith(base) and not u.startswith("data:")]
        assert not outside, f"the page fetched from elsewhere: {outside}"

        # A full-page screenshot for people to look at.
        height = await page.eval("document.documentElement.scrollHeight")
        await page.send(
            "Emulation.setDeviceMetricsOverride", width=1500, height=height, deviceScaleFactor=1, mobile=False
        )
        await asyncio.sleep(1.0)  # charts resize to the new width
        shot = await page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
        assert not page.problems(), page.problems()

        # Management: pause an account from its form; the running proxy applies it within 2 seconds.
        await page.send("Page.navigate", url=base + "/claudeflare/pause_account")
        await page.wait_for(
            "document.readyState === 'complete' && !!document.querySelector('input[name=account]')",
            what="the pause form",
        )
        await page.eval("""(() => {
            document.querySelector('input[name=account]').value = 'beta';
            document.querySelector('form.sql').submit();
        })()""")
        await page.wait_for(
            "location.pathname === '/claudeflare/control' && document.readyState === 'complete'",
            what="the control table after pausing",
        )
        sent_at = time.monotonic()
        while not (
            applied := query_readonly(home / "claudeflare.db", "select * from control where applied_at is not null")
        ):
            assert time.monotonic() - sent_at < 2.0, "the proxy did not apply the pause within 2 seconds"
            await asyncio.sleep(0.05)
        assert [(r["action"], r["account"], r["result"]) for r in applied] == [("pause", "beta", "ok")]
        assert [a.name for a in load_accounts(home).accounts if a.paused] == ["beta"]
        health = ""
        deadline = time.monotonic() + 15
        while "paused" not in health:  # the proxy republishes account_status every second
            assert time.monotonic() < deadline, f"the health table does not show beta paused: {health!r}"
            await page.send("Page.navigate", url=base + "/-/dashboards/pool?range=1+hour&account=beta")
            await page.wait_for(
                "document.readyState === 'complete' && !!document.querySelector('#chart-health tr')",
                what="the health table",
            )
            health = await page.eval("document.querySelector('#chart-health').innerText")
        assert not page.problems(), page.problems()
        return charts
    finally:
        await page.ws.close()
        await session.close()


# Each chart by how it is drawn, from the metadata itself: a chart added later is checked too.
CHARTS = yaml.safe_load((ROOT / "datasette-metadata.yml").read_text())["plugins"]["datasette-dashboards"]["pool"][
    "charts"
]
METRICS = {name for name, chart in CHARTS.items() if chart["library"] == "metric"}
TABLES = {name for name, chart in CHARTS.items() if chart["library"] == "table"}
TEXT = {name for name, chart in CHARTS.items() if chart["library"] == "markdown"}


# --- accounts from the browser ---------------------------------------------------------------------

ACCOUNTS_PAGE = "/-/claudeflare/accounts"


@pytest.mark.timeout(120)
def test_an_account_added_in_the_browser_serves_then_is_removed(fake, home, start_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("CLAUDEFLARE_TOKEN_URL", f"{fake.url}/v1/oauth/token")  # the dashboard's log-ins go to the fake
    proxy = start_proxy(home)  # no accounts yet: it picks them up as they are added
    assert ask(proxy, "before") == 503
    with dashboard_and_chromium(home, tmp_path) as (base, devtools_port):
        pasted, seen = asyncio.run(add_serve_remove(devtools_port, base, fake, home, proxy))
    secrets = [pasted.partition("#")[0], *seen]
    logs = (tmp_path / "dashboard.log").read_text(errors="replace") + proxy.output()
    assert not [s for s in secrets if s in logs]
    assert load_accounts(home).accounts == ()


async def add_serve_remove(devtools_port: int, base: str, fake, home: Path, proxy) -> tuple[str, list[str]]:
    """Log in, add `web-max` through the OAuth form, see it listed and serve a request, remove it.
    Returns the pasted CODE#STATE and the stored tokens, and checks no page or URL showed them."""
    session, page = await open_page(devtools_port)
    html = []

    async def snapshot():
        html.append(await page.eval("document.documentElement.outerHTML"))

    try:
        await log_in(page, base, ACCOUNTS_PAGE)
        await page.wait_for("location.pathname === '/-/dashboards/pool'", what="the dashboard after logging in")
        await page.send("Page.navigate", url=base + ACCOUNTS_PAGE)
        await page.wait_for(
            "document.readyState === 'complete' && !!document.querySelector('form.oauth-start')",
            what="the accounts page",
        )
        await page.eval("""(() => {
            const form = document.querySelector('form.oauth-start');
            form.querySelector('[name=name]').value = 'web-max';
            form.querySelector('[name=mode]').value = 'max';
            form.querySelector('[name=tier]').value = '5';
            form.submit();
        })()""")
        url = await page.wait_for(
            "document.readyState === 'complete' && document.querySelector('#authorize')?.href",
            what="the authorization link",
        )
        await snapshot()
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        code = f"code-web-max-{time.monotonic_ns()}"  # what the person's log-in yields
        fake.add_auth_code(code, account="web-max", state=query["state"], code_challenge=query["code_challenge"])
        pasted = f"{code}#{query['state']}"
        await page.eval(f"""(() => {{
            document.querySelector('form.oauth-finish [name=code]').value = {json.dumps(pasted)};
            document.querySelector('form.oauth-finish').submit();
        }})()""")
        await page.wait_for(
            f"location.pathname === '{ACCOUNTS_PAGE}' && document.readyState === 'complete' && "
            "!!document.querySelector('tr[data-account=\"web-max\"]')",
            what="web-max listed",
        )
        assert "added web-max (max, tier 5)" in await page.eval("document.body.innerText")
        await snapshot()
        credential = CredentialStore(home).credentials()["web-max"]
        stored = [credential.access_token, credential.refresh_token]

        # The running proxy reloads accounts.toml within a second: the new subscription serves.
        deadline = time.monotonic() + 5
        while (status := ask(proxy, "after")) != 200:
            assert time.monotonic() < deadline, f"the proxy still answers {status}"
            await asyncio.sleep(0.2)
        assert [r["account"] for r in db_rows(home, "status = 200", expect=1)] == ["web-max"]

        await page.eval("document.querySelector('tr[data-account=\"web-max\"] form.remove').submit()")
        await page.wait_for(
            "document.readyState === 'complete' && !!document.querySelector('form.remove-confirm')",
            what="the confirmation",
        )
        await page.eval("document.querySelector('form.remove-confirm').submit()")
        await page.wait_for(
            f"location.pathname === '{ACCOUNTS_PAGE}' && document.readyState === 'complete' && "
            "document.body.innerText.includes('removed web-max')",
            what="web-max removed",
        )
        assert not await page.eval("!!document.querySelector('tr[data-account=\"web-max\"]')")
        await snapshot()
        deadline = time.monotonic() + 5
        while (status := ask(proxy, "removed")) != 503:
            assert time.monotonic() < deadline, f"the removed account still serves ({status})"
            await asyncio.sleep(0.2)

        assert not page.problems(), page.problems()
        shown = "\n".join(html + page.requested())
        assert not [s for s in [code, *stored] if s in shown]
        return pasted, stored
    finally:
        await page.ws.close()
        await session.close()
