import json
import os
import shlex
import stat
import time

import click
import pytest
from click.testing import CliRunner

from claudeflare.accounts import hash_client_key, load_accounts, load_pool
from claudeflare.cli import cli
from claudeflare.credentials import CredentialStore
from claudeflare.flowlog import open_db
from claudeflare.listing import account_rows

KEY = "sk-ant-api03-" + "k" * 40


@pytest.fixture
def run(home):
    runner = CliRunner()

    def run(*args, input=None, ok=True):
        result = runner.invoke(cli, ["--home", str(home), *args], input=input)
        if ok:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code != 0, result.output
        return result

    return run


def claude_code_login(path, access="sk-ant-oat01-" + "a" * 40, refresh="sk-ant-ort01-" + "r" * 40, hours=8):
    path.write_text(
        json.dumps(
            {
                "claudeAiOauth": {
                    "accessToken": access,
                    "refreshToken": refresh,
                    "expiresAt": int((time.time() + hours * 3600) * 1000),
                    "scopes": ["user:inference"],
                    "subscriptionType": "max",
                }
            }
        )
    )
    return path


def test_add_api_key_from_stdin(run, home):
    result = run("add", "work-key", "--mode", "api-key", "--tier", "1", input=KEY + "\n")
    assert "added work-key" in result.output and KEY not in result.output
    assert [a.name for a in load_accounts(home).accounts] == ["work-key"]
    assert CredentialStore(home).credentials()["work-key"].api_key == KEY
    assert KEY not in (home / "accounts.toml").read_text()
    for name in ("credentials.json", "accounts.toml"):
        assert stat.S_IMODE(os.stat(home / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700


def test_add_refuses_a_duplicate_and_keeps_the_first_key(run, home):
    run("add", "k", "--mode", "api-key", input=KEY + "\n")
    result = run("add", "k", "--mode", "api-key", input="sk-ant-api03-other-key-xxxxxxxx\n", ok=False)
    assert "already exists" in result.output
    assert CredentialStore(home).credentials()["k"].api_key == KEY


@pytest.mark.parametrize("bad", ["", "short", "has space inside it", "sk-ant\r\nX-Injected: 1"])
def test_add_rejects_malformed_keys(run, home, bad):
    result = run("add", "k", "--mode", "api-key", input=bad + "\n", ok=False)
    assert "does not look like" in result.output
    assert not (home / "accounts.toml").exists()


def test_add_rejects_bad_names(run):
    result = run("add", "bad name", "--mode", "api-key", input=KEY + "\n", ok=False)
    assert "invalid name" in result.output


def test_add_with_key_from_environment_variable(run, home):
    run("add", "envy", "--mode", "api-key", "--api-key-env", "WORK_KEY")
    assert load_accounts(home).accounts[0].api_key_env == "WORK_KEY"
    assert "envy" not in CredentialStore(home).credentials()


def test_import_claude_code_login(run, home, tmp_path):
    source = claude_code_login(tmp_path / "creds.json")
    result = run("import", "my-max", "--mode", "max", "--tier", "5", "--from", str(source))
    assert "imported my-max (max, tier 5), token expires in 7h59m" in result.output
    cred = CredentialStore(home).credentials()["my-max"]
    assert cred.access_token.startswith("sk-ant-oat01-") and cred.refresh_token.startswith("sk-ant-ort01-")
    assert abs(cred.expires_at - (time.time() + 8 * 3600)) < 60
    assert load_accounts(home).accounts[0].tier == 5


def test_import_errors(run, tmp_path):
    assert "not found" in run("import", "m", "--mode", "max", "--from", str(tmp_path / "none.json"), ok=False).output
    (tmp_path / "bad.json").write_text("{not json")
    assert "cannot read" in run("import", "m", "--mode", "max", "--from", str(tmp_path / "bad.json"), ok=False).output
    (tmp_path / "empty.json").write_text("{}")
    assert (
        "no claudeAiOauth"
        in run("import", "m", "--mode", "max", "--from", str(tmp_path / "empty.json"), ok=False).output
    )


def test_list_table_and_json(run, home, tmp_path):
    run("add", "key", "--mode", "api-key", "--priority", "2", input=KEY + "\n")
    run("import", "sub", "--mode", "max", "--tier", "20", "--from", str(claude_code_login(tmp_path / "c.json")))
    db = open_db(home / "claudeflare.db")
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())

    db["requests"].insert_all([{"id": str(i), "started_at": now, "account": "sub"} for i in range(3)])
    db["requests"].insert({"id": "old", "started_at": "2001-01-01T00:00:00.000Z", "account": "sub"})

    db["account_status"].insert(
        {
            "name": "sub",
            "state": "limited",
            "limited_until": "2030-01-01T00:00:00.000Z",
            "utilization_5h": 1.02,
            "reason": "five_hour limit, until the reset",
            "updated_at": now,
        }
    )
    db["account_status"].insert({"name": "key", "state": "limited", "updated_at": "2001-01-01T00:00:00.000Z"})  # stale
    db.close()

    table = run("list").output.splitlines()
    assert table[0].split() == [
        "NAME",
        "PROVIDER",
        "MODE",
        "TIER",
        "PRIORITY",
        "STATE",
        "TOKEN",
        "EXPIRES",
        "AT",
        "REQUESTS",
        "TODAY",
        "5H",
        "7D",
        "7D",
        "OPUS",
        "7D",
        "SONNET",
        "EXTRA",
        "LIMITED",
        "UNTIL",
        "REASON",
    ]
    assert table[1].split()[:6] == ["key", "anthropic", "api-key", "1", "2", "ok"]
    assert table[2].split()[:6] == ["sub", "anthropic", "max", "20", "0", "limited"] and table[2].split()[9:11] == [
        "3",
        "102%",
    ]
    assert "2030-01-01T00:00:00.000Z  five_hour limit, until the reset" in table[2]

    rows = json.loads(run("list", "--json").output)
    assert [(r["name"], r["requests_today"]) for r in rows] == [("key", 0), ("sub", 3)]
    assert rows[1]["token_expires_at"] > time.time()
    assert "sk-ant" not in run("list", "--json").output


def test_list_with_no_accounts(run):
    assert "no accounts yet" in run("list").output


def test_list_reports_a_broken_file_with_its_line(run, home):
    home.mkdir()
    (home / "accounts.toml").write_text('[[accounts]]\nname = "a"\nmode = "max"\ntier = 7\n')
    assert "line 1: account 'a': 'tier' must be 1, 5 or 20" in run("list", ok=False).output


def test_pause_resume_remove(run, home):
    run("add", "a", "--mode", "api-key", input=KEY + "\n")
    (home / "accounts.toml").write_text("# my comment\n" + (home / "accounts.toml").read_text())
    run("pause", "a")
    assert load_accounts(home).accounts[0].paused
    assert "# my comment" in (home / "accounts.toml").read_text()  # edits keep the user's comments
    run("resume", "a")
    assert not load_accounts(home).accounts[0].paused
    assert "no account named 'zz'" in run("pause", "zz", ok=False).output
    run("remove", "a", input="n\n", ok=False)
    assert load_accounts(home).accounts
    run("remove", "a", "--yes")
    assert not load_accounts(home).accounts and "a" not in CredentialStore(home).credentials()


def test_remove_from_a_home_without_accounts_says_so(run, home):
    # Was a KeyError (the document had no "accounts" to look into), also on the dashboard's page.
    result = run("remove", "nobody", "--yes", ok=False)
    assert result.exit_code == 1 and "no account named 'nobody'" in result.output


def test_strategy_show_and_switch(run, home, monkeypatch):
    monkeypatch.delenv("LB_STRATEGY", raising=False)
    assert run("strategy").output.startswith("session (proxy option")
    run("strategy", "round-robin")
    assert load_accounts(home).strategy == "round-robin"
    assert run("strategy").output.strip() == "round-robin"
    assert "'fastest' is not one of" in run("strategy", "fastest", ok=False).output


def test_client_keys(run, home):
    result = run("client-key", "create", "laptop")
    key = result.stdout.strip()
    assert key.startswith("cfk-") and len(key) > 40
    assert key not in (home / "credentials.json").read_text()
    assert load_pool(home).client_for(key) == "laptop"
    assert hash_client_key(key) in (home / "credentials.json").read_text()
    assert "already exists" in run("client-key", "create", "laptop", ok=False).output
    assert [r["name"] for r in json.loads(run("client-key", "list", "--json").output)] == ["laptop"]
    run("client-key", "revoke", "laptop")
    assert load_pool(home).client_for(key) is None
    assert "no client key named" in run("client-key", "revoke", "laptop", ok=False).output


def test_every_command_has_help(run):
    for command in ("add", "import", "list", "pause", "resume", "remove", "strategy", "dashboard", "client-key"):
        assert "Usage:" in run(command, "--help").output


def fill_history(home):
    db = open_db(home / "claudeflare.db")
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    hour_ago = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 3600))
    db["requests"].insert_all(
        [
            {
                "id": "1",
                "started_at": now,
                "account": "a",
                "status": 200,
                "input_tokens": 10,
                "output_tokens": 5,
                "cost_usd": 0.5,
            },
            {"id": "2", "started_at": now, "account": "a", "status": 429, "error": "rate_limit_error", "cost_usd": 0.0},
            {
                "id": "3",
                "started_at": hour_ago,
                "account": "b",
                "status": 200,
                "input_tokens": 7,
                "output_tokens": 1,
                "cost_usd": 0.25,
            },
            {"id": "4", "started_at": "2020-01-01T00:00:00.000Z", "account": "b", "status": 200, "cost_usd": 9.0},
        ]
    )
    db.close()


def test_stats_over_a_window(run, home):
    home.mkdir()
    fill_history(home)
    day = {r["account"]: r for r in json.loads(run("stats", "--json").output)["accounts"]}
    assert (day["a"]["requests"], day["a"]["errors"], day["a"]["rate_limited"], day["a"]["cost_usd"]) == (2, 1, 1, 0.5)
    assert (day["b"]["requests"], day["b"]["input_tokens"]) == (1, 7)
    recent = json.loads(run("stats", "--since", "30m", "--json").output)["accounts"]
    assert [r["account"] for r in recent] == ["a"]
    ever = {r["account"]: r for r in json.loads(run("stats", "--since", "2019-01-01", "--json").output)["accounts"]}
    assert ever["b"]["requests"] == 2 and ever["b"]["cost_usd"] == 9.25
    assert "since" in run("stats").output and "rate_limited".upper().replace("_", " ") in run("stats").output
    assert "use 30m, 24h, 7d" in run("stats", "--since", "yesterday-ish", ok=False).output


def test_reset_stats_keeps_history(run, home):
    home.mkdir()
    fill_history(home)
    run("reset-stats")
    assert json.loads(run("stats", "--since", "2019-01-01", "--json").output)["accounts"] == []
    assert "no requests since" in run("stats").output
    assert len(json.loads(run("stats", "--json").output)["accounts"]) == 0
    assert open_db(home / "claudeflare.db")["requests"].count == 4


def test_clear_history(run, home):
    home.mkdir()
    fill_history(home)
    run("clear-history", input="n\n", ok=False)
    assert open_db(home / "claudeflare.db")["requests"].count == 4
    assert "deleted 1 request(s)" in run("clear-history", "--before", "2021-01-01", "--yes").output
    assert "deleted 3 request(s)" in run("clear-history", "--yes").output
    assert "not-a-date" in run("clear-history", "--before", "not-a-date", "--yes", ok=False).output


def test_set_tier_and_priority(run, home):
    run("add", "a", "--mode", "api-key", input=KEY + "\n")
    run("set", "a", "--tier", "20", "--priority", "3")
    account = load_accounts(home).accounts[0]
    assert (account.tier, account.priority) == (20, 3)
    assert "give --tier and/or --priority" in run("set", "a", ok=False).output
    assert "no account named" in run("set", "zz", "--tier", "5", ok=False).output
    assert "'7' is not one of" in run("set", "a", "--tier", "7", ok=False).output


def test_login_and_refresh_refuse_api_key_accounts(run):
    run("add", "a", "--mode", "api-key", input=KEY + "\n")
    assert "api-key account" in run("login", "a", ok=False).output
    assert "no refresh token" in run("refresh", "a", ok=False).output
    assert "no account named" in run("login", "zz", ok=False).output


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"accounts": []}',
        '{"accounts": {"a": "sk-ant-api03-secret-in-a-string"}}',
        '{"client_keys": {"laptop": "x"}}',
        '{"client_keys": {"laptop": {"created_at": "2026"}}}',
        '{"accounts": {"a": {"api_key": "sk-ant-api03-secretsecret", "expires_at": "soon"}}}',
        '{"accounts": {"a": {"access_token": "sk-ant-oat01-secretsecret", "expires_at": 1e300}}}',
        b"\xff\xfe{}",
    ],
)
def test_a_corrupt_or_misshapen_credentials_file_gets_a_clear_message(run, home, content):
    run("add", "a", "--mode", "api-key", input=KEY + "\n")
    path = home / "credentials.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for args in (("client-key", "create", "laptop"), ("client-key", "list"), ("list",), ("client-key", "revoke", "x")):
        result = run(*args, ok=False)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (
            args,
            result.exception,
        )  # no traceback
        assert str(path) in result.output and "Traceback" not in result.output and "secret" not in result.output, args


def test_a_non_utf8_accounts_file_is_named_with_its_line(run, home):
    run("add", "a", "--mode", "api-key", input=KEY + "\n")
    path = home / "accounts.toml"
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    line = path.read_bytes().count(b"\n")
    for args in (("list",), ("pause", "a"), ("strategy",), ("strategy", "round-robin"), ("set", "a", "--tier", "5")):
        result = run(*args, ok=False)
        assert result.exit_code == 1 and f"{path} line {line}: not UTF-8" in result.output, (args, result.output)
    path.write_text("[[accounts]\n")  # tomlkit's parse error, on the way to an edit
    assert str(path) in run("pause", "a", ok=False).output


def test_version_comes_from_the_package_metadata(run, home):
    from importlib.metadata import version

    home.write_text("")  # a home that is not a folder is refused, but --version needs no home
    assert run("--version").output == f"claudeflare, version {version('claudeflare')}\n"
    assert "is a file" in run("list", ok=False).output


EXAMPLE_COMMANDS = (("add",), ("import",), ("stats",), ("client-key", "create"))


def examples(help_text: str) -> list[str]:
    """The command lines of a help text's `Example:` block."""
    block = help_text.split("Example:\n\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines()]


@pytest.mark.parametrize("command", EXAMPLE_COMMANDS, ids=" ".join)
def test_help_examples_are_kept_as_lines_and_parse(run, command):
    lines = examples(run(*command, "--help").output)
    assert lines and all(
        line.startswith("claudeflare " + " ".join(command) + " ") and line.count("claudeflare") == 1 for line in lines
    )
    for line in lines:  # click kept each on its own line (`\b`), and each is a valid invocation today
        args = shlex.split(line)[1:]
        args = args[: next((i for i, a in enumerate(args) if a in "<>"), len(args))]  # shell redirections
        group = cli
        while isinstance(group, click.Group):
            group = group.commands[args.pop(0)]
        group.make_context(group.name, args)  # parses and converts every option, without running the command


def test_list_rows_are_plain_data_from_the_library(run, home):
    run("add", "key", "--mode", "api-key", "--priority", "2", input=KEY + "\n")
    run("add", "envy", "--mode", "api-key", "--api-key-env", "UNSET_CLAUDEFLARE_TEST_KEY")
    rows = account_rows(home)
    assert [(r["name"], r["state"], r["priority"]) for r in rows] == [("key", "ok", 2), ("envy", "no-credentials", 0)]
    assert json.loads(run("list", "--json").output) == rows


def test_add_a_compatible_account_writes_what_accounts_toml_reads_back(run, home):
    result = run(
        "add",
        "glm",
        "--provider",
        "anthropic-compatible",
        "--base-url",
        "https://llm.example.com/api/anthropic",
        "--auth",
        "bearer",
        "--model",
        "claude-sonnet-*=glm-4.6",
        "--model",
        "claude-*=glm-4.5-air",
        "--priority",
        "1",
        input="glm-key-0123456789\n",
    )
    assert "added glm (anthropic-compatible, tier 1)" in result.output
    (account,) = load_accounts(home).accounts
    assert (account.provider, account.mode, account.priority, account.settings.auth) == (
        "anthropic-compatible",
        "api-key",
        1,
        "bearer",
    )
    assert account.settings.models == (
        ("claude-sonnet-*", "glm-4.6"),
        ("claude-*", "glm-4.5-air"),
    )  # in the order given
    assert "glm-key" not in (home / "accounts.toml").read_text()
    assert CredentialStore(home).credentials()["glm"].api_key == "glm-key-0123456789"
    assert json.loads(run("list", "--json").output)[0]["provider"] == "anthropic-compatible"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--provider", "anthropic-compatible"), "'base_url' is required"),
        (
            ("--provider", "anthropic-compatible", "--base-url", "https://x", "--model", "claude-*"),
            "--model takes GLOB=MODEL",
        ),
        (("--mode", "api-key", "--base-url", "https://x"), "--base-url: not for provider anthropic"),
        (
            (
                "--tier",
                "1",
            ),
            "Missing option '--mode'",
        ),
    ],
)
def test_add_refuses_provider_options_that_do_not_fit(run, home, args, message):
    result = run("add", "glm", *args, input="glm-key-0123456789\n", ok=False)
    assert message in result.output and not (home / "accounts.toml").exists()


def test_add_a_vertex_account_asks_for_no_key(run, home, tmp_path):
    result = run(
        "add",
        "gcp",
        "--provider",
        "vertex",
        "--region",
        "us-east5",
        "--project",
        "my-project",
        "--credentials-file",
        str(tmp_path / "sa.json"),
        "--model",
        "claude-x=claude-x@1",
        input="",
    )
    assert "added gcp (vertex, tier 1)" in result.output
    (account,) = load_accounts(home).accounts
    assert (account.settings.region, account.settings.project, account.settings.credentials_file) == (
        "us-east5",
        "my-project",
        str(tmp_path / "sa.json"),
    )
    assert account.settings.models == (("claude-x", "claude-x@1"),)
    assert CredentialStore(home).credentials() == {}


def test_add_a_bedrock_account(run, home):
    assert (
        "added aws (bedrock, tier 1)"
        in run(
            "add",
            "aws",
            "--provider",
            "bedrock",
            "--region",
            "eu-west-1",
            "--profile",
            "claude",
            "--priority",
            "1",
            input="",
        ).output
    )
    (account,) = load_accounts(home).accounts
    assert (account.provider, account.settings.region, account.settings.profile, account.priority) == (
        "bedrock",
        "eu-west-1",
        "claude",
        1,
    )
    assert (
        "--profile: not for provider vertex"
        in run("add", "gcp", "--provider", "vertex", "--profile", "x", ok=False).output
    )


AWS_KEY_ID, AWS_SECRET = "AKIASTOREDSTORED0001", "stored/secret+key0123456789abcdef"


def test_add_a_bedrock_account_with_a_stored_key_pair_from_stdin(run, home):
    added = run(
        "add",
        "aws",
        "--provider",
        "bedrock",
        "--region",
        "us-east-1",
        "--aws-key-pair",
        input=f"{AWS_KEY_ID}\n{AWS_SECRET}\n",
    )
    assert "added aws (bedrock, tier 1)" in added.output and AWS_SECRET not in added.output
    stored = CredentialStore(home).credentials()["aws"]
    assert (stored.aws_access_key_id, stored.aws_secret_access_key) == (AWS_KEY_ID, AWS_SECRET)
    assert (home / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert AWS_SECRET not in (home / "accounts.toml").read_text()
    listed = run("list", "--json").output
    assert json.loads(listed)[0]["provider"] == "bedrock" and AWS_SECRET not in listed and AWS_KEY_ID not in listed


@pytest.mark.parametrize(
    "args, pair, message",
    [
        (("--provider", "bedrock", "--profile", "claude"), f"{AWS_KEY_ID}\n{AWS_SECRET}\n", "--aws-key-pair is for"),
        (("--provider", "vertex"), f"{AWS_KEY_ID}\n{AWS_SECRET}\n", "--aws-key-pair is for"),
        (("--provider", "bedrock"), f"not-a-key-id-{AWS_SECRET}\n{AWS_SECRET}\n", "AWS access key id"),
        (("--provider", "bedrock"), f"{AWS_KEY_ID}\n\n", "does not look like"),
    ],
)
def test_add_refuses_a_bad_aws_key_pair_and_writes_nothing(run, home, args, pair, message):
    result = run("add", "aws", *args, "--aws-key-pair", input=pair, ok=False)
    assert message in result.output and AWS_SECRET not in result.output
    assert not (home / "accounts.toml").exists() and CredentialStore(home).credentials() == {}
