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
