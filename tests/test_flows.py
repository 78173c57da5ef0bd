"""`flows.inject_credential`: the account's credential replaces whatever the client sent (contract §2)."""

from mitmproxy import http
from mitmproxy.test import tutils

from claudeflare import wire
from claudeflare.accounts import Account
from claudeflare.credentials import Credential
from claudeflare.flows import OAUTH_BETA, inject_credential

KEY = "sk-ant-api03-account-0123456789abcdef"
TOKEN = "sk-ant-oat01-account-0123456789abcdef"
CONSOLE = Account("console", "api-key")
MAX = Account("max", "max", 5)


def client_headers(**extra) -> http.Headers:
    """What a hostile client may send: its own credentials, twice and in any case."""
    headers = http.Headers(
        [
            (b"Authorization", b"Bearer sk-ant-oat01-client"),
            (b"authorization", b"Bearer second"),
            (b"X-Api-Key", b"sk-ant-api03-client"),
            (b"content-type", b"application/json"),
        ]
    )
    headers.update(extra)
    return headers


def test_an_api_key_account_sends_only_its_key_and_the_clients_beta_as_is():
    headers = client_headers(**{"anthropic-beta": "prompt-caching-2024-07-31"})
    inject_credential(headers, CONSOLE, Credential(api_key=KEY))
    assert headers.get_all("x-api-key") == [KEY]
    assert "authorization" not in headers
    assert headers.get_all("anthropic-beta") == ["prompt-caching-2024-07-31"]
    assert headers["content-type"] == "application/json"


def test_an_oauth_account_sends_only_its_token_with_the_oauth_beta():
    headers = client_headers()
    inject_credential(headers, MAX, Credential(access_token=TOKEN, refresh_token="sk-ant-ort01-x", expires_at=1e10))
    assert headers.get_all("authorization") == [f"Bearer {TOKEN}"]
    assert "x-api-key" not in headers
    assert headers["anthropic-beta"] == OAUTH_BETA
    assert "sk-ant-ort01-x" not in str(headers.fields)  # the refresh token never goes upstream


def test_the_oauth_beta_is_merged_once_into_the_clients_flags():
    for sent, merged in [
        (
            "claude-code-20250219, interleaved-thinking-2025-05-14",
            f"claude-code-20250219,interleaved-thinking-2025-05-14,{OAUTH_BETA}",
        ),
        (f"{OAUTH_BETA},claude-code-20250219", f"{OAUTH_BETA},claude-code-20250219"),
        (" , ", OAUTH_BETA),
    ]:
        headers = client_headers(**{"anthropic-beta": sent})
        for _ in range(2):  # another attempt on the same headers adds nothing more
            inject_credential(headers, MAX, Credential(access_token=TOKEN))
        assert headers.get_all("anthropic-beta") == [merged]


def test_a_credential_holding_both_kinds_sends_the_key_only():
    headers = client_headers()
    inject_credential(headers, CONSOLE, Credential(api_key=KEY, access_token=TOKEN))
    assert headers.get_all("x-api-key") == [KEY] and "authorization" not in headers
    assert "anthropic-beta" not in headers


def test_the_concealed_flow_shows_a_placeholder_and_holds_nothing_without_a_credential():
    request = tutils.treq()
    headers = client_headers()
    inject_credential(headers, MAX, Credential(access_token=TOKEN))
    wire.conceal(request, headers, MAX.name)
    assert request.headers["authorization"] == "Bearer [claudeflare: max]"
    assert request.headers["anthropic-beta"] == OAUTH_BETA and TOKEN not in str(request.headers.fields)
    assert wire.on_wire(request).headers["authorization"] == f"Bearer {TOKEN}"

    bare = tutils.treq()
    wire.conceal(bare, http.Headers(host="example.com"), MAX.name)
    assert wire.on_wire(bare) is bare  # nothing registered: no copy, no secret
