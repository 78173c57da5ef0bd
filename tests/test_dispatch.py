"""mitmproxy's hook dispatch, indexed by event (claudeflare/dispatch.py), in a real master."""

import asyncio

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.test import taddons, tflow

from claudeflare import dispatch


class Seen:
    def __init__(self, name: str, log: list, halt: bool = False):
        self.name, self.log, self.halt = name, log, halt

    def request(self, flow):
        self.log.append(self.name)
        if self.halt:
            raise exceptions.AddonHalt


class Nested:
    """Handles nothing itself; a sub-addon does (as a script's namespace does)."""

    def __init__(self, inner):
        self.addons = [inner]


class Broken:
    def request(self, flow):
        raise ValueError("boom")


@pytest.fixture
def manager():
    dispatch.install()
    with taddons.context() as tctx:
        yield tctx.master.addons


def fire(manager):
    asyncio.run(manager.trigger_event(HttpRequestHook(tflow.tflow())))


def test_handlers_run_in_chain_order_and_others_are_not_visited(manager):
    log = []
    a, b = Seen("a", log), Seen("b", log)
    manager.add(a, type("Idle", (), {})(), Nested(b))
    fire(manager)
    assert log == ["a", "b"]
    assert [dispatch.handles(x, "request") for x in manager.chain[-3:]] == [True, False, True]
    assert len(manager.__dict__[dispatch.INDEX]["request"]) < len(manager.chain)  # the index skips the idle


def test_the_index_follows_the_chain_as_it_changes(manager):
    log = []
    first = Seen("first", log)
    manager.add(first)
    fire(manager)
    later = Seen("later", log)
    manager.add(later)  # after the index was built: it must be found again
    fire(manager)
    manager.remove(first)
    fire(manager)
    assert log == ["first", "first", "later", "later"]


def test_halt_stops_the_event_and_an_error_does_not(manager):
    log = []
    manager.add(Broken(), Seen("halts", log, halt=True), Seen("never", log))
    fire(manager)  # the broken handler is logged by safecall, as unpatched mitmproxy does
    assert log == ["halts"]


def test_install_twice_patches_once():
    dispatch.install()
    register = type(taddons.context().master.addons).register
    dispatch.install()
    assert type(taddons.context().master.addons).register is register


def test_hook_args_are_its_fields_in_order():
    dispatch.install()
    flow = tflow.tflow()
    assert HttpRequestHook(flow).args() == [flow]
    assert hooks.ConfigureHook({"a"}).args() == [{"a"}]
