"""The installable package: `pip wheel .` builds a wheel that, installed into a fresh virtualenv, serves
the dashboard — its metadata and plugins travel inside the package.

Only claudeflare comes from the wheel: the fresh virtualenv sees this one's site-packages (the
dependencies) through a .pth file, which keeps the test offline and to seconds. A .pth line only adds
a folder to sys.path, so the editable install's own hook in that folder stays inactive."""

import contextlib
import shutil
import subprocess
import sys
import sysconfig
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ROOT, free_port, wait_for_port

pytestmark = [pytest.mark.timeout(90), pytest.mark.e2e]  # builds and installs a wheel, runs the dashboard

METADATA = "datasette-metadata.yml"
PLUGINS = ("claudeflare_dashboard.py", "claudeflare_login.py")
# What a checkout holds besides the project (`build/` would let a stale earlier build into the wheel).
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "node_modules",
    "*.egg-info",
    "__pycache__",
    "artifacts",
    "*.db",
    "*.db-*",
    ".pytest_cache",
    ".hypothesis",
)


@contextlib.contextmanager
def running(args: list, log: Path) -> Iterator[subprocess.Popen]:
    """A process from the installed wheel, run from a folder without the checkout, stopped at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, check=True, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)  # the metadata link stays a link, as in git
    # No build isolation: this virtualenv's setuptools builds it, rather than one downloaded.
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        source,
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "-w",
        tmp / "dist",
    )
    (built,) = (tmp / "dist").glob("claudeflare-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "--no-deps",
        "--no-index",
        "--disable-pip-version-check",
        wheel,
    )
    site = Path(
        run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_a_checkout_serves_its_top_level_metadata():
    from claudeflare.cli import METADATA as served

    assert served == ROOT / METADATA  # the user's file, so an edit shows at the next start


def test_the_wheel_carries_the_dashboards_metadata_and_plugins(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert f"claudeflare/{METADATA}" in names
    assert all(f"claudeflare/datasette_plugins/{p}" in names for p in PLUGINS)
    assert {"claudeflare/providers/__init__.py", "claudeflare/providers/compatible.py"} <= set(
        names
    )  # accounts.py imports them
    assert zipfile.ZipFile(wheel).read(f"claudeflare/{METADATA}") == (ROOT / METADATA).read_bytes()


def test_an_installed_wheel_serves_the_dashboard(venv, tmp_path):
    python, claudeflare = venv / "bin" / "python", venv / "bin" / "claudeflare"
    # From a folder without the checkout, whose `claudeflare/` would otherwise be imported instead.
    where = run(python, "-c", "import claudeflare.cli as c; print(c.__file__); print(c.METADATA)", cwd=tmp_path)
    module, metadata = map(Path, where.stdout.split())
    assert module.is_relative_to(venv) and metadata.is_relative_to(venv) and not metadata.is_symlink()
    assert metadata.read_bytes() == (ROOT / METADATA).read_bytes()

    help_text = run(claudeflare, "dashboard", "--help", cwd=tmp_path).stdout
    assert "--metadata" in help_text and str(metadata.parent) in help_text.replace("\n", "").replace(" ", "")

    port = free_port()
    dashboard_args = [claudeflare, "--home", tmp_path / "home", "dashboard", "--port", port, "--public"]
    with running(dashboard_args, tmp_path / "dashboard.log") as dashboard:
        wait_for_port(port, 30, alive=lambda: dashboard.poll() is None)
        # Anonymous reading with --public is the packaged plugin's doing; the title is the packaged metadata's.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/dashboards/pool", timeout=10) as reply:
            assert reply.status == 200
            assert "Claudeflare — account pool" in reply.read().decode()


def test_an_installed_wheel_serves_the_pool(wheel, venv, tmp_path):
    """`claudeflare serve` runs the addon the wheel carries: no checkout needed."""
    assert (
        zipfile.ZipFile(wheel).read("claudeflare/entry/claudeflare.py") == (ROOT / "addon/claudeflare.py").read_bytes()
    )
    port = free_port()
    serve_args = [venv / "bin" / "claudeflare", "--home", tmp_path / "home", "serve", "--workers", 1]
    with running([*serve_args, "--listen-host", "127.0.0.1", "--listen-port", port], tmp_path / "serve.log") as serve:
        wait_for_port(port, 60, alive=lambda: serve.poll() is None)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/messages", data=b"{}", headers={"content-type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503 and b"Claudeflare has no accounts" in refused.value.read()
        worker = (tmp_path / "serve.log").read_text()
        assert (
            str(venv)
            in run(
                venv / "bin" / "python", "-c", "import claudeflare; print(claudeflare.__file__)", cwd=tmp_path
            ).stdout
        )
        assert "Traceback" not in worker, worker
