import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from claudeflare.credentials import Credential
from claudeflare.policy import (
    CLAUDE_CODE_IDENTITIES,
    check_subscription_clients,
    credential_fingerprint,
    is_claude_code,
    model_family,
    refusal,
)

from harness import CLAUDE_CODE_SYSTEM

BILLING = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.fa0; cc_entrypoint=sdk-cli;"}


def claude_code_body(identity=CLAUDE_CODE_IDENTITIES[2], model="claude-opus-4-8", turns=40) -> bytes:
    """Shaped like Claude Code 2.1.197's (captured): keys in its order, messages before the system, ~100 KB."""
    prompt = {
        "type": "text",
        "text": "\nYou are an interactive agent. " + "x" * 30_000,
        "cache_control": {"type": "ephemeral"},
    }
    messages = [
        {"role": "user", "content": [{"type": "text", "text": f"turn {i} " + "y" * 1000}]} for i in range(turns)
    ]
    body = {
        "model": model,
        "messages": messages,
        "system": [BILLING, {"type": "text", "text": identity, "cache_control": {"type": "ephemeral"}}, prompt],
        "tools": [{"name": f"T{i}", "description": "z" * 1000, "input_schema": {"type": "object"}} for i in range(24)],
        "metadata": {"user_id": json.dumps({"device_id": "ab" * 32, "account_uuid": "", "session_id": "s"})},
        "max_tokens": 32000,
        "stream": True,
    }
    return json.dumps(body, separators=(",", ":")).encode()


@pytest.mark.parametrize("identity", CLAUDE_CODE_IDENTITIES)
def test_claude_code_bodies_are_recognised(identity):
    body = claude_code_body(identity)
    assert len(body) > 75_000
    assert is_claude_code(body)


def test_the_test_harness_prompt_is_claude_code():
    # Python's json.dumps puts spaces after ':' and ','; the scan allows any JSON whitespace.
    body = json.dumps(
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 5,
            "system": CLAUDE_CODE_SYSTEM,
            "messages": [{"role": "user", "content": "hi"}],
        },
        indent=2,
    ).encode()
    assert is_claude_code(body)


@pytest.mark.parametrize(
    "system",
    [
        None,
        "You are Claude Code, Anthropic's official CLI for Claude.",  # a string, not Claude Code's blocks
        [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}
        ],  # identity first: not where Claude Code puts it
        [BILLING],  # the billing header alone
        [BILLING, {"type": "text", "text": "You are a helpful assistant."}],
        [{"type": "text", "text": "You are a helpful assistant."}, {"type": "text", "text": CLAUDE_CODE_IDENTITIES[0]}],
        [BILLING, {"type": "image", "text": CLAUDE_CODE_IDENTITIES[0]}],
        [BILLING, {"type": "text", "text": ["not", "a", "string"]}],
    ],
)
def test_other_system_prompts_are_not(system):
    body = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    if system is not None:
        body["system"] = system
    assert not is_claude_code(json.dumps(body).encode())


def test_claude_code_text_inside_a_message_is_not_a_system_prompt():
    quoted = json.dumps({"system": [BILLING, {"type": "text", "text": CLAUDE_CODE_IDENTITIES[0]}]})
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 5,
        "system": "You are a pirate.",
        "messages": [{"role": "user", "content": quoted}, {"role": "system", "content": "x"}],
    }
    assert not is_claude_code(json.dumps(body).encode())


def test_a_nested_system_key_before_the_real_one_does_not_hide_it():
    body = claude_code_body()
    tool = b'{"type":"tool_use","id":"t","name":"x","input":{"system":[{"type":"text","text":"no"},1]}}'
    body = body.replace(b'"messages":[', b'"messages":[{"role":"assistant","content":[' + tool + b"]},", 1)
    assert is_claude_code(body)


def test_truncated_and_oversized_blocks_are_refused():
    body = claude_code_body()
    assert not is_claude_code(body[: body.index(b"You are a Claude agent") + 10])
    huge = json.dumps(
        {
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: " + "a" * 100_000},
                {"type": "text", "text": CLAUDE_CODE_IDENTITIES[0]},
            ]
        }
    ).encode()
    assert not is_claude_code(huge)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_garbage_bytes_never_raise(data):
    assert is_claude_code(data) in (True, False)
    assert model_family(data) in (None, "opus", "sonnet", "haiku")


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(["system", "type", "text", "model"]), inner, max_size=4)
        ),
        max_leaves=20,
    ),
    st.sampled_from([0, 1, 7, 30, 200, 10_000]),
)
def test_garbage_json_and_cut_bodies_never_raise(value, cut):
    raw = json.dumps({"system": value, "model": value}).encode()
    for body in (raw, raw[:cut], raw + b"]" * 3):
        assert is_claude_code(body) in (True, False)
        model_family(body)


def test_model_family_is_read_without_parsing():
    assert model_family(claude_code_body(model="claude-opus-4-8")) == "opus"
    assert model_family(b'{"max_tokens": 5, "model": "claude-sonnet-4-5-20250929", "messages": []}') == "sonnet"
    assert model_family(b'{"model":"claude-3-5-haiku-latest"}') == "haiku"
    assert model_family(b'{"model":"gpt-4o"}') is None
    assert model_family(b'{"model": 7}') is None
    assert model_family(b"") is None


def test_subscription_clients_option():
    assert check_subscription_clients("claude-code") == "claude-code"
    assert check_subscription_clients("any") == "any"
    with pytest.raises(ValueError, match="claude-code, any"):
        check_subscription_clients("everything")


def error(message, kind="invalid_request_error"):
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"}).encode()


@pytest.mark.parametrize(
    "status, body, meaning",
    [
        (400, error("This organization has been disabled."), "disabled"),
        (
            403,
            error("OAuth authentication is currently not allowed for this organization.", "permission_error"),
            "disabled",
        ),
        (
            400,
            error(
                "This credential is only authorized for use with Claude Code and cannot be used for other API requests."
            ),
            "claude-code-only",
        ),
        (429, error("Extra usage is required for long context requests.", "rate_limit_error"), "long-context"),
        (429, error("Usage credits are required for long context requests.", "rate_limit_error"), "long-context"),
        (429, error("This request would exceed your account's rate limit.", "rate_limit_error"), None),
        (400, error("messages: Field required"), None),
        (500, error("This organization has been disabled."), None),  # only where Anthropic says it
        (400, b"not json", None),
        (400, b'{"error": "a string"}', None),
        (400, b'{"error": {"message": 7}}', None),
        (400, error("This organization has been disabled." + " " * 70_000), None),  # unbounded bodies are not read
    ],
)
def test_refusals_that_mean_something(status, body, meaning):
    assert refusal(status, body) == meaning


THIRD_PARTY = "Third-party apps now draw from your extra usage, not your plan limits. Add credits to continue."


@pytest.mark.parametrize(
    "status, body, third_party, meaning",
    [
        (400, error(THIRD_PARTY), False, "claude-code-only"),  # says so whoever sent it
        (400, error("Error"), True, "claude-code-only"),
        (429, error("Error", "rate_limit_error"), True, "claude-code-only"),
        (400, error("Error"), False, None),  # Claude Code's own request, or an API key: an error like any
        (429, error("Error", "rate_limit_error"), False, None),  # ... or a limit, by its headers
        (400, error("Error: messages: Field required"), True, None),
    ],
)
def test_the_older_forms_of_the_claude_code_only_refusal(status, body, third_party, meaning):
    assert refusal(status, body, third_party) == meaning


def test_credential_fingerprint_changes_with_a_new_login_or_key_only():
    old = Credential(access_token="sk-ant-oat01-a", refresh_token="sk-ant-ort01-a", expires_at=1.0)
    assert credential_fingerprint(old) == credential_fingerprint(
        Credential(access_token="sk-ant-oat01-a", refresh_token="sk-ant-ort01-a")
    )
    assert credential_fingerprint(old) != credential_fingerprint(
        Credential(access_token="sk-ant-oat01-b", refresh_token="sk-ant-ort01-b")
    )
    assert credential_fingerprint(Credential(api_key="sk-ant-api03-x")) != credential_fingerprint(
        Credential(api_key="sk-ant-api03-y")
    )
    assert "sk-ant" not in credential_fingerprint(old) and credential_fingerprint(None) is None


def test_deeply_nested_system_blocks_do_not_crash():
    assert not is_claude_code(b'{"system":[' + b"[" * 20_000 + b"]" * 20_000 + b"]}")
    assert not is_claude_code(b'{"system":[{"a":' * 5_000)
