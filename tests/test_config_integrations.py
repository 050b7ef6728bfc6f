"""Config sections of the analytical half: sla, csat, webhooks, segments, hub.metrics_public.

Every error has a line in the INLINE table below, in tests/test_config.py's style: the
YAML and the exact issues it must produce.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hub.config import (
    DEFAULT_CSAT_QUESTION,
    Config,
    ConfigError,
    CsatSettings,
    SegmentConfig,
    SlaPolicy,
    WebhookConfig,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent

# Channels, queues and hours the snippets below refer to.
BASE = """
channels:
  - name: web
    type: webchat
  - name: sms
    type: sms
    phone_number: "+14155550100"
    twilio: {account_sid: AC00000000000000000000000000000000, auth_token: t}
  - name: phone
    type: voice
    phone_number: "+14155550101"
    twilio: {account_sid: AC00000000000000000000000000000000, auth_token: t}
routing:
  queues:
    - name: general
    - name: billing
      business_hours: office
business_hours:
  - name: office
    timezone: Europe/Paris
    weekly: {mon: ["09:00-17:00"]}
"""
BASE_LINES = BASE.count("\n")  # snippets start on line BASE_LINES + 1


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(BASE + textwrap.dedent(text).lstrip("\n"), "hub.yaml", env or {})


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    return [str(issue) for issue in caught.value.issues]


def at(line: int) -> str:
    """`line N` of a snippet, as the whole file numbers it."""
    return f"line {BASE_LINES + line}"


SECRET = "0123456789abcdef0123"


# --- the shipped example ----------------------------------------------------------------


def test_example_file_documents_every_section() -> None:
    config = load_config(ROOT / "config" / "hub.example.yaml", env={})
    assert config.hub.metrics_public is True
    standard = config.sla.policy_for("general")
    assert standard is not None and standard.first_response == 3600
    billing = config.sla.policy_for("billing")
    assert billing is not None and billing.business_hours == "office"
    assert config.csat.enabled and config.csat.channels == ("sms", "support-email", "web")
    assert [w.name for w in config.webhooks] == ["crm"]
    assert config.webhooks[0].wants("csat.received")
    assert [s.name for s in config.segments] == ["unhappy-recent", "vip-open"]


# --- values and defaults ----------------------------------------------------------------


def test_defaults_when_absent() -> None:
    config = parse("")
    assert config.sla.policies == () and config.sla.check_every_seconds == 30
    assert config.csat == CsatSettings()
    assert config.csat.question == DEFAULT_CSAT_QUESTION
    assert config.webhooks == () and config.segments == ()
    assert config.hub.metrics_public is True


def test_full_sections_parse() -> None:
    config = parse(
        """
        hub:
          metrics_public: false
        sla:
          check_every_seconds: 10s
          policies:
            - name: billing-sla
              queues: [billing]
              first_response: 30m
              next_response: 2h
              resolution: 2d
              business_hours: queue
              pause_while_pending: false
              warn_before: 5m
            - name: standard
              first_response: 1h
        csat:
          enabled: true
          channels: [sms, web]
          question: Rate us 1-5
          delay_seconds: 0
          window_seconds: 1d
        webhooks:
          - name: crm
            url: https://crm.example.com/hooks?source=hub
            events: [message.received, sla.breach]
            secret: ${CRM_SECRET}
            timeout_seconds: 5s
            max_attempts: 3
        segments:
          - name: unhappy
            tags: [vip]
            channels: [sms]
            channel_types: [webchat]
            last_contact_within: 30d
            csat_at_most: 2
            has_open_conversation: false
        """,
        env={"CRM_SECRET": SECRET},
    )
    assert config.hub.metrics_public is False
    assert config.sla.check_every_seconds == 10
    assert config.sla.policies[0] == SlaPolicy(
        name="billing-sla",
        queues=("billing",),
        first_response=1800,
        next_response=7200,
        resolution=172800,
        business_hours="queue",
        pause_while_pending=False,
        warn_before=300,
    )
    assert config.sla.policy_for("billing") is config.sla.policies[0]
    assert config.sla.policy_for("general") is config.sla.policies[1]  # the default
    assert config.sla.policy_for(None) is config.sla.policies[1]
    assert config.csat == CsatSettings(True, ("sms", "web"), "Rate us 1-5", 0, 86400)
    assert config.webhooks == (
        WebhookConfig(
            name="crm",
            url="https://crm.example.com/hooks?source=hub",
            events=("message.received", "sla.breach"),
            secret=SECRET,
            timeout_seconds=5,
            max_attempts=3,
        ),
    )
    assert not config.webhooks[0].wants("note.created")
    assert config.segment("unhappy") == SegmentConfig(
        name="unhappy",
        tags=("vip",),
        channels=("sms",),
        channel_types=("webchat",),
        last_contact_within=30 * 86400,
        csat_at_most=2,
        has_open_conversation=False,
    )
    with pytest.raises(KeyError):
        config.segment("nope")


def test_no_default_policy_means_unlisted_queues_have_none() -> None:
    config = parse("sla:\n  policies:\n    - {name: b, queues: [billing], resolution: 1d}\n")
    assert config.sla.policy_for("general") is None


# --- every error ------------------------------------------------------------------------

INLINE = [
    # sla
    (
        "sla:\n  policies:\n    - name: a\n      first_response: 1h\n      speed: fast\n",
        [f"{at(5)}: sla.policies[0].speed: unknown key (expected one of: name, queues, "
         "first_response, next_response, resolution, business_hours, pause_while_pending, "
         "warn_before)"],
    ),
    (
        "sla:\n  policies:\n    - name: a\n      queues: [general]\n",
        [f"{at(3)}: sla.policies[0].first_response: give at least one of: first_response, "
         "next_response, resolution"],
    ),
    (
        "sla:\n  policies:\n    - {name: a, first_response: 1h}\n    - {name: a, resolution: 1d}\n",
        [f"{at(4)}: sla.policies[1].name: duplicate SLA policy name 'a' "
         f"(first at sla.policies[0].name, line {BASE_LINES + 3})"],
    ),
    (
        "sla:\n  policies:\n    - {name: a, queues: [billing], first_response: 1h}\n"
        "    - {name: b, queues: [billing], resolution: 1d}\n",
        [f"{at(4)}: sla.policies[1].queues[0]: duplicate SLA queue 'billing' "
         f"(first at sla.policies[0].queues[0], line {BASE_LINES + 3})"],
    ),
    (
        "sla:\n  policies:\n    - {name: a, first_response: 1h}\n    - {name: b, resolution: 1d}\n",
        [f"{at(4)}: sla.policies[1].queues: only one policy may leave out queues (the one at "
         f"sla.policies[0].name, line {BASE_LINES + 3}, already covers every other queue)"],
    ),
    (
        "sla:\n  policies:\n    - {name: a, queues: [sales], first_response: 1h}\n",
        [f"{at(3)}: sla.policies[0].queues[0]: unknown queue 'sales' "
         "(declared queues: general, billing)"],
    ),
    (
        "sla:\n  policies:\n    - {name: a, first_response: 1h, business_hours: night}\n",
        [f"{at(3)}: sla.policies[0].business_hours: unknown business hours 'night' "
         "(declared business hours: office)"],
    ),
    (
        "sla:\n  policies:\n    - {name: a, first_response: 10m, warn_before: 10m}\n",
        [f"{at(3)}: sla.policies[0].warn_before: must be shorter than every target of the policy"],
    ),
    (
        "sla:\n  policies:\n    - {name: a, first_response: soon}\n",
        [f"{at(3)}: sla.policies[0].first_response: must be a number of seconds or a duration "
         "like 45s, 30m, 12h, 7d"],
    ),
    (
        "sla:\n  check_every_seconds: 0\n",
        [f"{at(2)}: sla.check_every_seconds: must be >= 1"],
    ),
    # csat
    (
        "csat:\n  enabled: yes please\n",
        [f"{at(2)}: csat.enabled: must be true or false"],
    ),
    (
        "csat:\n  channels: [sms, fax]\n",
        [f"{at(2)}: csat.channels[1]: unknown channel 'fax' (declared channels: web, sms, phone)"],
    ),
    (
        "csat:\n  channels: [phone]\n",
        [f"{at(2)}: csat.channels[0]: channel 'phone' is a voice line: surveys go by text"],
    ),
    (
        "csat:\n  window_seconds: 30s\n",
        [f"{at(2)}: csat.window_seconds: must be >= 60"],
    ),
    (
        "csat:\n  question: ''\n",
        [f"{at(2)}: csat.question: must not be empty"],
    ),
    (
        "csat:\n  delay_second: 5m\n",
        [f"{at(2)}: csat.delay_second: unknown key (did you mean 'delay_seconds'?)"],
    ),
    # webhooks
    (
        f"webhooks:\n  - name: crm\n    url: ftp://crm.example.com\n    events: ['*']\n"
        f"    secret: {SECRET}\n",
        [f"{at(3)}: webhooks[0].url: must be an http(s) URL like "
         "https://crm.example.com/hooks/hub"],
    ),
    (
        f"webhooks:\n  - name: crm\n    url: https://crm.example.com\n"
        f"    events: [message.received, ticket.created]\n    secret: {SECRET}\n",
        [f"{at(4)}: webhooks[0].events[1]: must be one of: message.received, message.sent, "
         "message.delivery, note.created, call, voicemail, conversation.status, "
         "conversation.assigned, customer.merged, csat.received, sla.warning, sla.breach, *"],
    ),
    (
        f"webhooks:\n  - name: crm\n    url: https://crm.example.com\n    events: []\n"
        f"    secret: {SECRET}\n",
        [f"{at(4)}: webhooks[0].events: list at least one event type (or * for all)"],
    ),
    (
        "webhooks:\n  - name: crm\n    url: https://crm.example.com\n    events: ['*']\n",
        [f"{at(2)}: webhooks[0].secret: required (e.g. secret: ${{MY_WEBHOOK_SECRET}})"],
    ),
    (
        "webhooks:\n  - name: crm\n    url: https://crm.example.com\n    events: ['*']\n"
        "    secret: short\n",
        [f"{at(5)}: webhooks[0].secret: must be at least 16 characters (a long random string)"],
    ),
    (
        "webhooks:\n  - name: crm\n    url: https://crm.example.com\n    events: ['*']\n"
        "    secret: ${CRM_SECRET}\n",
        [f"{at(5)}: webhooks[0].secret: environment variable CRM_SECRET is not set"],
    ),
    (
        f"webhooks:\n  - {{name: a, url: 'https://a.example', events: ['*'], secret: {SECRET}}}\n"
        f"  - {{name: a, url: 'https://b.example', events: ['*'], secret: {SECRET}}}\n",
        [f"{at(3)}: webhooks[1].name: duplicate webhook name 'a' "
         f"(first at webhooks[0].name, line {BASE_LINES + 2})"],
    ),
    (
        f"webhooks:\n  - {{name: a, url: 'https://a.example', events: ['*'], secret: {SECRET}, "
        "max_attempts: 0}\n",
        [f"{at(2)}: webhooks[0].max_attempts: must be between 1 and 1000"],
    ),
    # segments
    (
        "segments:\n  - name: everyone\n",
        [f"{at(2)}: segments[0].tags: give at least one filter: tags, channels, channel_types, "
         "last_contact_within, csat_at_most, has_open_conversation"],
    ),
    (
        "segments:\n  - {name: sad, csat_at_most: 7}\n",
        [f"{at(2)}: segments[0].csat_at_most: must be between 1 and 5"],
    ),
    (
        "segments:\n  - {name: a, channels: [email]}\n",
        [f"{at(2)}: segments[0].channels[0]: unknown channel 'email' "
         "(declared channels: web, sms, phone)"],
    ),
    (
        "segments:\n  - {name: a, channel_types: [fax]}\n",
        [f"{at(2)}: segments[0].channel_types[0]: must be one of: email, sms, voice, webchat"],
    ),
    (
        "segments:\n  - {name: a, tags: [x]}\n  - {name: a, tags: [y]}\n",
        [f"{at(3)}: segments[1].name: duplicate segment name 'a' "
         f"(first at segments[0].name, line {BASE_LINES + 2})"],
    ),
    (
        "segments:\n  - {name: a, has_open_conversation: maybe}\n",
        [f"{at(2)}: segments[0].has_open_conversation: must be true or false"],
    ),
    (
        "segments:\n  - {name: a, last_contact_within: -1}\n",
        [f"{at(2)}: segments[0].last_contact_within: must be >= 1"],
    ),
    # hub
    (
        "hub:\n  metrics_public: sometimes\n",
        [f"{at(2)}: hub.metrics_public: must be true or false"],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), INLINE)
def test_inline_errors(text: str, expected: list[str]) -> None:
    assert errors(text) == expected


def test_errors_of_several_sections_are_reported_together() -> None:
    text = "sla:\n  policies:\n    - {name: a}\ncsat:\n  channels: [phone]\n"
    found = errors(text + "segments:\n  - {name: s}\n")
    assert [issue.split(": ")[1] for issue in found] == [
        "sla.policies[0].first_response",
        "csat.channels[0]",
        "segments[0].tags",
    ]
