import subprocess

import pytest

from fake_anthropic import FakeAnthropic
from harness import claudeflare_proxy

E2E_FIXTURES = {"start_proxy"}  # fixtures that start a process


def pytest_collection_modifyitems(items):
    """Mark `e2e` every test that starts a process: by its file's name or its fixtures (others say so
    themselves), so that `pytest -m "not e2e"` runs the fast tests alone."""
    for item in items:
        if item.path.name.endswith("_e2e.py") or E2E_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def fast_tests_start_no_process(request, monkeypatch):
    """A test not marked `e2e` that starts a process fails, rather than slow down `-m "not e2e"`."""
    if request.node.get_closest_marker("e2e") is None:

        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a process: mark it `e2e`")

        monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


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
        proxy = claudeflare_proxy(
            home, upstream or fake.url, tmp_path / f"mitmdump-{len(started)}.log", *extra, env=env
        )
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
