import copy
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.http import Headers

from claudeflare.conversation import conversation_key

SESSION = "3f2a9c1e-7b4d-4e8a-9c2b-1d5e6f7a8b9c"
OTHER = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
DEVICE = "ab" * 32

SYSTEM = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
    {"type": "text", "text": "Long instructions ✓", "cache_control": {"type": "ephemeral"}},
]
FIRST_USER = {
    "role": "user",
    "content": [{"type": "text", "text": "fix the bug", "cache_control": {"type": "ephemeral"}}],
}


def body(**fields) -> bytes:
    base = {"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": True, "system": SYSTEM, "messages": [FIRST_USER]}
    base.update(fields)
    return json.dumps(base).encode()


def metadata(session: str) -> dict:
    return {"user_id": json.dumps({"device_id": DEVICE, "account_uuid": "", "session_id": session})}


def test_header_wins():
    key = conversation_key({"X-Claude-Code-Session-Id": f"  {SESSION} "}, body(metadata=metadata(OTHER)))
    assert key == SESSION


def test_header_lookup_is_case_insensitive():
    assert conversation_key({"x-claude-code-session-id": SESSION}, b"") == SESSION
    assert conversation_key({"X-CLAUDE-CODE-SESSION-ID": SESSION}, b"") == SESSION
    assert conversation_key(Headers(x_claude_code_session_id=SESSION), b"") == SESSION


def test_body_is_not_parsed_when_the_header_gives_the_key(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("body parsed")

    monkeypatch.setattr("claudeflare.conversation.json.loads", fail)
    assert conversation_key({"X-Claude-Code-Session-Id": SESSION}, body()) == SESSION


def test_implausible_header_falls_back_to_the_body():
    for value in ("", "   ", "x" * 201, "bad\nvalue", "nul\x00"):
        assert conversation_key({"X-Claude-Code-Session-Id": value}, body(metadata=metadata(SESSION))) == SESSION


def test_metadata_json_session_id():
    assert conversation_key({}, body(metadata=metadata(SESSION))) == SESSION


def test_metadata_legacy_form():
    with_account = f"user_{DEVICE}_account_{OTHER}_session_{SESSION}"
    without_account = f"user_{DEVICE}_account__session_{SESSION}"
    assert conversation_key({}, body(metadata={"user_id": with_account})) == SESSION
    assert conversation_key({}, body(metadata={"user_id": without_account})) == SESSION


def test_header_and_metadata_give_the_same_key():
    from_header = conversation_key({"X-Claude-Code-Session-Id": SESSION}, body())
    from_metadata = conversation_key({}, body(metadata=metadata(SESSION)))
    from_legacy = conversation_key({}, body(metadata={"user_id": f"user_{DEVICE}_account__session_{SESSION}"}))
    assert from_header == from_metadata == from_legacy == SESSION


def test_unusable_metadata_falls_back_to_the_hash():
    expected = conversation_key({}, body())
    assert expected.startswith("h:") and len(expected) == 34
    for meta in (
        {"user_id": json.dumps({"device_id": DEVICE, "session_id": ""})},
        {"user_id": json.dumps({"device_id": DEVICE})},
        {"user_id": "{not json"},
        {"user_id": "user_abc"},
        {"user_id": 42},
        "not a dict",
    ):
        assert conversation_key({}, body(metadata=meta)) == expected


def test_hash_ignores_moved_cache_breakpoints():
    moved_system = copy.deepcopy(SYSTEM)
    del moved_system[1]["cache_control"]
    moved_system[0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    moved_user = {"role": "user", "content": [{"type": "text", "text": "fix the bug"}]}
    assert conversation_key({}, body(system=moved_system, messages=[moved_user])) == conversation_key({}, body())


def test_hash_stable_when_later_messages_are_appended():
    later = [
        {"role": "system", "content": "reminder"},
        FIRST_USER,
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": [{"type": "text", "text": "thanks", "cache_control": {"type": "ephemeral"}}]},
    ]
    assert conversation_key({}, body(messages=later)) == conversation_key({}, body())


def test_different_start_gives_a_different_key():
    other_user = {"role": "user", "content": "write tests"}
    assert conversation_key({}, body(messages=[other_user])) != conversation_key({}, body())
    assert conversation_key({}, body(system="other system")) != conversation_key({}, body())


def test_system_or_user_message_alone_is_enough():
    assert conversation_key({}, body(messages=[])).startswith("h:")
    assert conversation_key({}, json.dumps({"messages": [FIRST_USER]}).encode()).startswith("h:")


def test_none_cases():
    for raw in (
        None,
        b"",
        b"not json",
        b"\xff\xfe{}",
        b"[1, 2]",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' * 100_000,
        b"{}",
        json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(),
        json.dumps({"system": "", "messages": "nope"}).encode(),
    ):
        assert conversation_key({}, raw) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["role", "system", "messages", "metadata", "user_id", "cache_control", "x"])
            | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=500),
    st.dictionaries(st.text(max_size=30), st.text(max_size=250), max_size=3),
    st.text(max_size=250),
)
def test_arbitrary_bytes_and_headers_never_raise(raw, headers, session):
    for candidate in (headers, {**headers, "X-Claude-Code-Session-Id": session}):
        key = conversation_key(candidate, raw)
        assert key is None or isinstance(key, str)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["system", "messages", "metadata", "model"]), json_values, max_size=4))
def test_arbitrary_json_bodies_never_raise(fields):
    key = conversation_key({}, json.dumps(fields).encode())
    assert key is None or isinstance(key, str)
