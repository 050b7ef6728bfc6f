"""The configuration schema: the shipped files load, and every mistake is named by line and path."""

from __future__ import annotations

import textwrap
from datetime import UTC, date, datetime, time
from pathlib import Path

import pytest

from hub.config import (
    DEFAULT_CAPACITY,
    Config,
    ConfigError,
    ConfigIssue,
    EmailChannel,
    SmsChannel,
    VoiceChannel,
    WebchatChannel,
    demo_config,
    load_config,
    parse_config,
    parse_duration,
)
from hub.model import ChannelType, Role

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "config"
HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$bgXcZMwunaAj99qjmOPMsA"
    "$udOVqStpQsct/o4CiBoxHR8Y4rQF0PqkYW6/F1bxTBM"
)


def parse(text: str, env: dict[str, str] | None = None, base_dir: Path | None = None) -> Config:
    return parse_config(textwrap.dedent(text).lstrip("\n"), "hub.yaml", env or {}, base_dir)


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    return [str(issue) for issue in caught.value.issues]


# --- the shipped files ----------------------------------------------------------------


def test_example_file_loads_with_no_environment() -> None:
    config = load_config(ROOT / "config" / "hub.example.yaml", env={})
    assert {type(c) for c in config.channels} == {
        WebchatChannel,
        SmsChannel,
        VoiceChannel,
        EmailChannel,
    }
    assert [a.id for a in config.agents] == ["alice", "bob"]
    assert config.agent("alice").role is Role.ADMIN
    assert config.agent_by_login("ALICE@example.com") == config.agent("alice")
    assert config.agent_by_login("nobody") is None
    assert [q.name for q in config.routing.queues] == ["billing", "sales", "general"]
    assert config.queue("billing").fallback == "sales"
    assert config.routing.sticky_window_seconds == 7 * 86400
    office = config.hours("office")
    assert office.holidays == (date(2025, 12, 25), date(2026, 1, 1))
    assert office.weekly["mon"] == ((time(9), time(12, 30)), (time(13, 30), time(17, 30)))
    assert office.weekly["sun"] == ()
    phone = config.channel("phone")
    assert isinstance(phone, VoiceChannel)
    assert [o.digit for o in phone.ivr] == ["1", "2"]
    assert phone.twilio == config.channel("sms").twilio  # a YAML alias
    with pytest.raises(KeyError):
        config.channel("nope")
    with pytest.raises(KeyError):
        config.agent("nope")


def test_example_file_takes_secrets_from_the_environment() -> None:
    env = {"TWILIO_AUTH_TOKEN": "real-token", "HUB_PUBLIC_URL": "https://hub.acme.test/"}
    config = load_config(ROOT / "config" / "hub.example.yaml", env=env)
    sms = config.channel("sms")
    assert isinstance(sms, SmsChannel)
    assert sms.twilio.auth_token == "real-token"
    assert config.hub.public_url == "https://hub.acme.test"  # trailing slash dropped


def test_demo_file_loads(tmp_path: Path) -> None:
    config = demo_config(tmp_path / "demo", env={"HUB_DEMO_PASSWORD_HASH": HASH})
    assert config.hub.data_dir == (tmp_path / "demo").resolve()
    assert config.hub.public_url == "http://127.0.0.1:8080"
    assert config.storage.backend == "sqlite"
    assert config.storage.path == (tmp_path / "demo").resolve() / "hub.db"
    web = config.channel("web")
    assert isinstance(web, WebchatChannel)
    assert web.allowed_origins == ()
    demo = config.agent("demo")
    assert (demo.login, demo.role, demo.password_hash) == ("demo", Role.ADMIN, HASH)
    assert config.routing.default_queue == "default"


def test_demo_without_password_hash_says_which_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        demo_config(tmp_path, env={})
    assert [i.message for i in caught.value.issues] == [
        "environment variable HUB_DEMO_PASSWORD_HASH is not set"
    ]
    assert caught.value.issues[0].path == "agents[0].password_hash"


# --- broken files: each with the exact errors ------------------------------------------

BAD = [
    ("unknown_key.yaml", ["line 4: hub.listn: unknown key (did you mean 'listen'?)"]),
    ("missing_required.yaml", ["line 5: channels[0].twilio.auth_token: required"]),
    (
        "wrong_type.yaml",
        [
            "line 3: hub.listen.port: must be an integer",
            "line 4: hub.max_body_bytes: must be an integer",
            "line 6: storage.cluster: must be true or false",
        ],
    ),
    (
        "bad_enum.yaml",
        [
            "line 2: storage.backend: must be one of: sqlite, redis",
            "line 4: hub.log_level: must be one of: debug, info, warning, error",
        ],
    ),
    (
        "negative_capacity.yaml",
        [
            "line 5: agents[0].capacity.chat: must be >= 0",
            "line 6: agents[0].capacity.fax: unknown key "
            "(expected one of: email, sms, voice, webchat)",
        ],
    ),
    (
        "duplicate_channel_name.yaml",
        [
            "line 6: channels[2].name: duplicate channel name 'web' "
            "(first at channels[0].name, line 2)"
        ],
    ),
    (
        "unknown_skill.yaml",
        ["line 6: agents[0].skills[1]: unknown skill 'bilin' (declared skills: billing, french)"],
    ),
    (
        "unknown_ivr_queue.yaml",
        [
            "line 12: channels[0].ivr[1].queue: unknown queue 'suport' "
            "(declared queues: sales, support)",
            "line 13: channels[0].ivr[2].digit: duplicate digit '1' (first at channels[0].ivr[0])",
        ],
    ),
    (
        "fallback_cycle.yaml",
        [
            "line 7: routing.queues[2].fallback: fallback cycle billing -> sales -> billing",
            "line 9: routing.queues[3].fallback: fallback cycle loop -> loop",
        ],
    ),
    (
        "overlapping_hours.yaml",
        [
            "line 5: business_hours[0].weekly.mon[2]: 11:30-14:00 overlaps 09:00-12:00",
            "line 6: business_hours[0].weekly.tue[0]: start must be before end in "
            "'17:00-09:00' (split overnight hours across days)",
            'line 7: business_hours[0].weekly.wed[0]: must be a time range like "09:00-17:30"',
            "line 8: business_hours[0].weekly.thursday: unknown key "
            "(expected one of: mon, tue, wed, thu, fri, sat, sun)",
            "line 9: business_hours[0].holidays[1]: must be a date like 2025-12-25",
        ],
    ),
    (
        "bad_timezone.yaml",
        [
            "line 3: business_hours[0].timezone: unknown time zone 'Europe/Pariss' "
            "(did you mean 'Europe/Paris'?)"
        ],
    ),
    (
        "bad_phone.yaml",
        [
            "line 6: channels[0].phone_number: not a valid phone number: '12345' "
            "(write +14155550100, or a national number of region GB)",
            "line 14: agents[1].phone: not a valid phone number: '+1 555' "
            "(write +14155550100, or a national number of region GB)",
        ],
    ),
    (
        "unset_env.yaml",
        ["line 9: channels[1].twilio.auth_token: environment variable TWILIO_TOKEN is not set"],
    ),
    (
        "redis_without_url.yaml",
        [
            "line 2: storage.url: required when backend is redis",
            "line 3: storage.durability: must be one of: always, everysec, none",
        ],
    ),
    (
        "redis_bad_url.yaml",
        ["line 3: storage.url: must start with redis://, rediss:// or unix://"],
    ),
    (
        "yaml_syntax.yaml",
        ["line 4: YAML syntax error: expected <block end>, but found '<block mapping start>'"],
    ),
    ("duplicate_key.yaml", ["line 5: hub.listen.port: duplicate key (first at line 3)"]),
    (
        "empty.yaml",
        ["the file is empty (expected sections such as hub, channels, agents, routing)"],
    ),
    (
        "top_level_list.yaml",
        ["line 1: the top level must be a mapping of sections (hub, storage, channels, ...)"],
    ),
    (
        "bad_password_hash.yaml",
        [
            "line 3: agents[0].password_hash: must be an argon2id hash "
            "(run `hub hash-password` to make one)",
            "line 4: agents[1].password_hash: required (run `hub hash-password` to make one)",
            "line 5: agents[2].id: must be 1-40 characters of a-z 0-9 _ . -, "
            "starting with a-z or 0-9",
            "line 6: agents[2].password_hash: is not a well-formed argon2id hash "
            "(run `hub hash-password` to make one)",
        ],
    ),
    (
        "unknown_channel_type.yaml",
        [
            "line 3: channels[0].type: must be one of: email, sms, voice, webchat",
            "line 5: channels[1].name: must be 1-40 characters of a-z 0-9 _ -, "
            "starting with a-z or 0-9",
            "line 7: channels[2].name: required",
        ],
    ),
    (
        "email_channel.yaml",
        [
            "line 4: channels[0].address: not an email address: 'not-an-address'",
            "line 9: channels[0].imap.move_to: required when after_processing is move",
            "line 10: channels[0].imap.port: must be between 1 and 65535",
            "line 13: channels[0].smtp.password: required when username is set",
            "line 16: channels[1].offline_email_channel: channel 'text' is of type sms, not email",
            "line 17: channels[1].allowed_origins[0]: must be an origin like "
            "https://example.com (scheme and host, no path) or *",
            "line 21: channels[2].twilio.account_sid: must be a Twilio account SID "
            "(starts with AC)",
        ],
    ),
    (
        "queue_rules.yaml",
        [
            "line 3: routing.default_queue: unknown queue 'nowhere' "
            "(declared queues: billing, sales)",
            "line 4: routing.sticky_window_seconds: must be a number of seconds or a duration "
            "like 45s, 30m, 12h, 7d",
            "line 7: routing.queues[0].skills[1]: unknown skill 'tax' (declared skills: billing)",
            "line 8: routing.queues[0].after_hours_message: required when after_hours is "
            "auto_reply",
            "line 9: routing.queues[0].business_hours: unknown business hours 'office' "
            "(no business hours are declared)",
            "line 10: routing.queues[0].agents[1]: unknown agent 'zed' "
            "(declared agents: alice, alice2)",
            "line 12: routing.queues[0].match.channels[0]: unknown channel 'web' "
            "(no channels are declared)",
            "line 13: routing.queues[0].match.channel_types[0]: must be one of: "
            "email, sms, voice, webchat",
            "line 15: routing.queues[1].after_hours: needs business_hours "
            "(it applies outside them)",
            "line 21: agents[1].login: duplicate login 'ALICE' (first at agents[0].login, line 18)",
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), BAD, ids=[name for name, _ in BAD])
def test_broken_file_reports_exact_errors(name: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(FIXTURES / "bad" / name, env={})
    assert [str(issue) for issue in caught.value.issues] == expected


def test_every_bad_fixture_is_in_the_table() -> None:
    assert sorted(p.name for p in (FIXTURES / "bad").glob("*.yaml")) == sorted(n for n, _ in BAD)


def test_all_errors_of_one_file_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(FIXTURES / "many_errors.yaml", env={})
    found = [(i.line, i.path) for i in caught.value.issues]
    assert found == [
        (3, "hub.listn"),
        (4, "hub.default_region"),
        (6, "storage.url"),
        (10, "channels[0].rate_limit_per_minute"),
        (11, "channels[1].name"),
        (14, "channels[1].twilio.auth_token"),
        (18, "agents[0].password_hash"),
        (19, "agents[0].skills[0]"),
        (20, "agents[0].capacity.chat"),
        (26, "routing.queues[1].fallback"),
        (27, "routing.queues[1].strategy"),
        (30, "business_hours[0].timezone"),
        (31, "business_hours[0].weekly.mon[1]"),
    ]


# --- the error format ------------------------------------------------------------------


def test_config_error_prefixes_each_issue_with_source_and_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(
            """
            hub:
              listn: {}
            agents:
              - id: a
                password_hash: $HASH
                capacity: {chat: -2}
            """.replace("$HASH", HASH)
        )
    err = caught.value
    assert err.source == "hub.yaml"
    assert str(err) == (
        "hub.yaml:2: hub.listn: unknown key (did you mean 'listen'?)\n"
        "hub.yaml:6: agents[0].capacity.chat: must be >= 0"
    )
    assert str(err.issues[1]) == "line 6: agents[0].capacity.chat: must be >= 0"


def test_issue_without_line_or_path() -> None:
    assert str(ConfigIssue("", None, "the file is empty")) == "the file is empty"
    assert ConfigIssue("", None, "x").located("a.yaml") == "a.yaml: x"
    assert str(ConfigIssue("hub.port", 3, "bad")) == "line 3: hub.port: bad"
    assert str(ConfigError([ConfigIssue("", None, "cannot read")], "h.yaml")) == (
        "h.yaml: cannot read"
    )


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml", env={})
    assert str(caught.value) == f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory"


# --- interpolation -----------------------------------------------------------------------

TWILIO_SMS = """
channels:
  - name: text
    type: sms
    phone_number: "+14155550100"
    twilio:
      account_sid: {sid}
      auth_token: {token}
"""


def sms_twilio(sid: str, token: str, env: dict[str, str]) -> tuple[str, str]:
    config = parse(TWILIO_SMS.format(sid=sid, token=token), env)
    channel = config.channel("text")
    assert isinstance(channel, SmsChannel)
    return channel.twilio.account_sid, channel.twilio.auth_token


def test_interpolation_of_set_variable() -> None:
    env = {"SID": "AC42", "TOKEN": "s3cret"}
    assert sms_twilio("${SID}", "tok-${TOKEN}-x", env) == ("AC42", "tok-s3cret-x")


def test_interpolation_default_when_unset_or_empty() -> None:
    assert sms_twilio("${SID:-AC1}", "${TOKEN:-fallback}", {}) == ("AC1", "fallback")
    assert sms_twilio("${SID:-AC1}", "${TOKEN:-fallback}", {"TOKEN": ""}) == ("AC1", "fallback")
    assert sms_twilio("${SID:-AC1}", "${TOKEN:-}x", {}) == ("AC1", "x")


def test_double_dollar_is_a_literal_dollar() -> None:
    assert sms_twilio("AC1", "'a$$b$${NOT_A_VAR}'", {}) == ("AC1", "a$b${NOT_A_VAR}")
    # A lone $ stays: argon2 hashes are full of them.
    assert sms_twilio("AC1", "a$b", {}) == ("AC1", "a$b")


def test_interpolation_errors_name_the_path() -> None:
    text = TWILIO_SMS.format(sid="AC1", token="${TOKEN")
    assert errors(text) == [
        "line 7: channels[0].twilio.auth_token: unterminated ${ (write $$ for a literal $)"
    ]
    text = TWILIO_SMS.format(sid="${1SID}", token="${TOKEN}")
    assert errors(text) == [
        "line 6: channels[0].twilio.account_sid: invalid reference ${1SID} "
        "(write ${VAR} or ${VAR:-default})",
        "line 7: channels[0].twilio.auth_token: environment variable TOKEN is not set",
    ]


def test_unquoted_value_is_typed_after_interpolation() -> None:
    text = """
    hub:
      listen: {port: "${PORT:-9000}"}
    """
    assert errors(text) == ["line 2: hub.listen.port: must be an integer"]
    config = parse("hub:\n  listen:\n    port: ${PORT:-9000}\n", {"PORT": "8081"})
    assert config.hub.port == 8081
    assert config.hub.public_url == "http://127.0.0.1:8081"


def test_empty_unquoted_default_means_unset() -> None:
    config = parse(
        """
        channels:
          - name: web
            type: webchat
            identity_secret: ${CHAT_SECRET:-}
        """
    )
    web = config.channel("web")
    assert isinstance(web, WebchatChannel)
    assert web.identity_secret is None


# --- values and defaults ---------------------------------------------------------------


def test_minimal_file_gets_every_default(tmp_path: Path) -> None:
    config = parse("hub: {}\n", base_dir=tmp_path)
    assert config.hub.public_url == "http://127.0.0.1:8080"
    assert (config.hub.host, config.hub.port, config.hub.default_region) == (
        "127.0.0.1",
        8080,
        "US",
    )
    assert config.hub.data_dir == tmp_path.resolve() / "data"
    assert config.storage.path == tmp_path.resolve() / "data" / "hub.db"
    assert config.channels == () and config.agents == () and config.business_hours == ()
    assert [q.name for q in config.routing.queues] == ["default"]
    assert config.routing.default_queue == "default"


def test_normalizes_phone_email_and_region() -> None:
    config = parse(
        f"""
        hub:
          default_region: gb
        channels:
          - name: text
            type: sms
            phone_number: 020 7183 8750
            twilio: {{account_sid: AC1, auth_token: "0123"}}
          - name: mail
            type: email
            address: Support@Example.COM
            imap: {{host: imap.example.com, username: u, password: p}}
            smtp: {{host: smtp.example.com}}
        agents:
          - id: a
            password_hash: {HASH}
            phone: "07911 123456"
            capacity: {{chat: 1, voice: 0}}
        """
    )
    assert config.hub.default_region == "GB"
    sms = config.channel("text")
    assert isinstance(sms, SmsChannel)
    assert sms.phone_number == "+442071838750"
    assert sms.twilio.auth_token == "0123"  # as written, not the YAML 1.1 octal 83
    mail = config.channel("mail")
    assert isinstance(mail, EmailChannel)
    assert mail.address == "support@example.com"
    assert mail.type == ChannelType.EMAIL == "email"
    agent = config.agent("a")
    assert agent.phone == "+447911123456"
    assert agent.capacity == {**DEFAULT_CAPACITY, "webchat": 1, "voice": 0}
    assert (agent.name, agent.login) == ("a", "a")


def test_merge_keys_and_durations() -> None:
    config = parse(
        """
        channels:
          - name: one
            type: sms
            phone_number: "+14155550100"
            twilio: &creds {account_sid: AC1, auth_token: t}
          - name: two
            type: voice
            phone_number: "+14155550101"
            twilio:
              <<: *creds
              auth_token: other
            ring_timeout_seconds: 1m
        routing:
          sticky_window_seconds: 1h30m
          requeue_after_seconds: 45
        """
    )
    two = config.channel("two")
    assert isinstance(two, VoiceChannel)
    assert (two.twilio.account_sid, two.twilio.auth_token) == ("AC1", "other")
    assert two.ring_timeout_seconds == 60
    assert config.routing.sticky_window_seconds == 5400
    assert config.routing.requeue_after_seconds == 45


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("1h30m", 5400), ("0s", 0)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "1w", "h", "-5s", "1.5h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_business_hours_is_open() -> None:
    config = parse(
        """
        business_hours:
          - name: paris
            timezone: Europe/Paris
            weekly:
              mon: ["09:00-12:00", "14:00-24:00"]
            holidays: [2025-12-29]
        """
    )
    hours = config.hours("paris")
    # Monday 2025-12-22; Paris is UTC+1 in winter.
    assert hours.is_open(datetime(2025, 12, 22, 8, 30, tzinfo=UTC))
    assert not hours.is_open(datetime(2025, 12, 22, 11, 0, tzinfo=UTC))
    assert hours.is_open(datetime(2025, 12, 22, 22, 59, tzinfo=UTC))
    assert not hours.is_open(datetime(2025, 12, 23, 9, 0, tzinfo=UTC))  # Tuesday: closed
    assert not hours.is_open(datetime(2025, 12, 29, 9, 0, tzinfo=UTC))  # holiday Monday


INLINE = [
    (
        "a: 1\n---\nb: 2\n",
        [
            "line 2: YAML syntax error: expected a single document in the stream "
            "but found another document"
        ],
    ),
    (
        "hub:\n  public_url: !!python/name:os.system x\n",
        ["line 2: hub.public_url: unsupported YAML tag tag:yaml.org,2002:python/name:os.system"],
    ),
    ("hub:\n  listen: !custom {port: 1}\n", ["line 2: hub.listen: unsupported YAML tag !custom"]),
    ("channels: [web]\n", ["line 1: channels[0]: must be a mapping"]),
    ("channels: {web: 1}\n", ["line 1: channels: must be a list"]),
    (
        "channels:\n  - name: w\n    type:\n",
        ["line 3: channels[0].type: required (one of: email, sms, voice, webchat)"],
    ),
    (
        f"agents:\n  - id: a\n    login: bob\n    password_hash: {HASH}\n"
        f"  - id: bob\n    password_hash: {HASH}\n",
        ["line 5: agents[1].id: duplicate login 'bob' (first at agents[0].login, line 3)"],
    ),
    (
        "routing:\n  queues: []\n  default_queue: x\n",
        ["line 3: routing.default_queue: unknown queue 'x' (declared queues: default)"],
    ),
    (
        "channels:\n  - name: w\n    type: webchat\n    offline_email_channel: nope\n",
        [
            "line 4: channels[0].offline_email_channel: unknown email channel 'nope' "
            "(no email channels are declared)"
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), INLINE)
def test_inline_errors(text: str, expected: list[str]) -> None:
    assert errors(text) == expected
