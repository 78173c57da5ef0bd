import hashlib
import sqlite3
import time

import pytest
from fake_anthropic import FakeAnthropic
from harness import add_account, claudeflare_proxy


@pytest.fixture(scope="session")
def fake_server():
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def fake(fake_server):
    fake_server.reset()
    return fake_server


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def start_proxy(tmp_path, fake):
    """Start a real `mitmdump -s addon/claudeflare.py` against the fake upstream."""
    started = []

    def start(home, *extra, env=None, upstream=None):
        proxy = claudeflare_proxy(home, upstream or fake.url, tmp_path / f"mitmdump-{len(started)}.log", *extra, env=env)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def db_rows(home, where="1=1", expect=None, timeout=10.0):
    """Rows of the flow log, waiting (bounded) until `expect` rows are there."""
    path = home / "claudeflare.db"
    deadline = time.monotonic() + timeout
    while True:
        rows = []
        if path.exists():
            conn = sqlite3.connect(path)
            conn.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in conn.execute(f"select * from requests where {where} order by started_at")]
            except sqlite3.OperationalError:
                pass
            finally:
                conn.close()
        if expect is None or len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def wait_until(predicate, timeout=5.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def key_for(name):
    return f"sk-ant-api03-{name}-" + hashlib.sha256(name.encode()).hexdigest()[:24]


def api_key_accounts(fake, home, *specs):
    """specs: (name, tier[, priority]) — enrolled in the proxy and known to the fake."""
    for name, tier, *priority in specs:
        fake.add_api_key(key_for(name), account=name)
        add_account(home, name, "api-key", tier, *priority, api_key=key_for(name))
