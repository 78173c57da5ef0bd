"""mitmproxy's hook dispatch, indexed by event (patched in mitmproxy 12.3, `addonmanager`).

`AddonManager.trigger_event` visits every addon of the chain for every event — about 45 with
mitmdump's defaults, most of them without a handler for it — each through a context manager and a
generator. Under bench_proxy's load that was about a fifth of mitmdump's CPU per request. Here each
event visits only the chain items that handle it (themselves or a sub-addon), found once per event
name and found again whenever the chain changes (add, register, remove, clear): the same handlers
in the same order, with the same error handling and the same AddonHalt. And `Hook.args`, called
once per handler, reads its dataclass's field names once per hook class instead of every time.
"""

import dataclasses
import functools

from mitmproxy import addonmanager, exceptions, hooks

INDEX = "_claudeflare_hooks"  # on the manager: event name -> the chain items that handle it


def handles(addon, name: str) -> bool:
    """Whether `addon` or a sub-addon has something under the hook's name (as `_iter_hooks` looks)."""
    return any(getattr(a, name, None) for a in addonmanager.traverse([addon]))


async def trigger_event(self: addonmanager.AddonManager, event: hooks.Hook) -> None:
    index = self.__dict__.setdefault(INDEX, {})
    chain = index.get(event.name)
    if chain is None:
        chain = index[event.name] = [a for a in self.chain if handles(a, event.name)]
    for addon in chain:
        try:
            with addonmanager.safecall():
                await self.invoke_addon(addon, event)
        except exceptions.AddonHalt:
            return


@functools.cache
def field_names(hook: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(hook))


def args(self: hooks.Hook) -> list:
    return [getattr(self, name) for name in field_names(type(self))]


def _invalidating(method):
    @functools.wraps(method)
    def changed(self, *args, **kwargs):
        self.__dict__.pop(INDEX, None)
        try:
            return method(self, *args, **kwargs)
        finally:
            self.__dict__.pop(INDEX, None)  # a script sets its namespace just after registering it:
            # the index is rebuilt lazily, at the next event, once that has happened

    changed.claudeflare = True
    return changed


def install() -> None:
    manager = addonmanager.AddonManager
    if getattr(manager.register, "claudeflare", False):
        return  # a reloaded script installs again
    for name in ("add", "register", "remove", "clear"):
        setattr(manager, name, _invalidating(getattr(manager, name)))
    manager.trigger_event = trigger_event
    hooks.Hook.args = args
