"""Stopping the proxy under load: SIGTERM loses no acknowledged row; kill -9 leaves a database that
opens cleanly and lacks at most the rows of the last second."""

import signal
import time

from harness import Load, api_key_accounts, claudeflare_proxy, logged_ids


def test_sigterm_under_load_loses_no_acknowledged_row(fake, home, tmp_path):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    proxy = claudeflare_proxy(home, fake.url, tmp_path / "mitm.log", "--set", "flow_detail=0").start()
    load = Load(proxy.url)
    time.sleep(3)
    assert proxy.stop(signal.SIGTERM) is not None
    load.stop()
    ids = logged_ids(home)
    assert len(load.acknowledged) > 100 and len(ids) == len(set(ids))
    assert {rid for rid, _ in load.acknowledged} <= set(ids)


def test_kill_9_under_load_leaves_a_clean_database_short_of_the_last_second(fake, home, tmp_path):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    proxy = claudeflare_proxy(home, fake.url, tmp_path / "mitm.log", "--set", "flow_detail=0").start()
    load = Load(proxy.url)
    time.sleep(3)
    killed_at = time.monotonic()
    proxy.stop(signal.SIGKILL)
    load.stop()
    ids = set(logged_ids(home))
    older = {rid for rid, at in load.acknowledged if at < killed_at - 1.0}
    assert len(older) > 100 and older <= ids
    lost = [at for rid, at in load.acknowledged if rid not in ids]
    assert all(at >= killed_at - 1.0 for at in lost)
