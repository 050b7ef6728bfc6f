"""Routing configuration cases tests/test_config.py does not already cover: fallbacks to
unknown queues, longer cycles, skills in queues, and the business-hours edges the
router relies on (24:00, time zones with daylight saving, naive times)."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import pytest

from hub.config import ConfigError, parse_config
from hub.routing.rules import HoursBook

HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$bgXcZMwunaAj99qjmOPMsA"
    "$udOVqStpQsct/o4CiBoxHR8Y4rQF0PqkYW6/F1bxTBM"
)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text).lstrip("\n"), "hub.yaml", {})
    return [str(issue) for issue in caught.value.issues]


def test_fallback_to_an_unknown_queue_is_an_error_at_its_path() -> None:
    assert errors(
        """
        routing:
          queues:
            - name: sales
              fallback: salse
        """
    ) == ["line 4: routing.queues[0].fallback: unknown queue 'salse' (declared queues: sales)"]


def test_a_three_queue_fallback_cycle_is_reported_once() -> None:
    assert errors(
        """
        routing:
          queues:
            - name: a
              fallback: b
            - name: b
              fallback: c
            - name: c
              fallback: a
        """
    ) == ["line 8: routing.queues[2].fallback: fallback cycle c -> a -> b -> c"]


def test_a_fallback_chain_without_cycle_is_fine() -> None:
    config = parse_config(
        "routing:\n  queues:\n    - {name: a, fallback: b}\n    - {name: b, fallback: c}\n"
        "    - {name: c}\n",
        "hub.yaml",
        {},
    )
    assert [q.fallback for q in config.routing.queues] == ["b", "c", None]


def test_queue_skill_and_agent_must_be_declared() -> None:
    found = errors(
        f"""
        routing:
          skills: [billing]
          queues:
            - name: q
              skills: [biling]
              agents: [ghost]
        agents:
          - id: ann
            password_hash: "{HASH}"
        """
    )
    assert found == [
        "line 5: routing.queues[0].skills[0]: unknown skill 'biling' (declared skills: billing)",
        "line 6: routing.queues[0].agents[0]: unknown agent 'ghost' (declared agents: ann)",
    ]


def test_hours_touching_end_to_start_do_not_overlap() -> None:
    config = parse_config(
        textwrap.dedent(
            """
            business_hours:
              - name: split
                timezone: UTC
                weekly:
                  mon: ["09:00-12:00", "12:00-24:00"]
            """
        ),
        "hub.yaml",
        {},
    )
    hours = config.hours("split")
    assert hours.is_open(datetime(2025, 1, 6, 12, 0, tzinfo=UTC))
    assert hours.is_open(datetime(2025, 1, 6, 23, 59, 59, tzinfo=UTC))  # 24:00 is the end
    assert not hours.is_open(datetime(2025, 1, 7, 0, 0, tzinfo=UTC))  # Tuesday: closed
    assert hours.is_open(datetime(2025, 1, 6, 10, 0))  # naive means UTC


def test_queue_hours_follow_daylight_saving_time() -> None:
    config = parse_config(
        textwrap.dedent(
            """
            routing:
              queues:
                - name: ny
                  business_hours: new-york
                - name: always
            business_hours:
              - name: new-york
                timezone: America/New_York
                weekly:
                  mon: ["09:00-17:00"]
            """
        ),
        "hub.yaml",
        {},
    )
    book = HoursBook(config.routing.queues, config.business_hours)
    winter_9am = datetime(2025, 1, 6, 14, 0, tzinfo=UTC).timestamp()  # UTC-5
    summer_9am = datetime(2025, 7, 7, 13, 0, tzinfo=UTC).timestamp()  # UTC-4
    assert book.is_open("ny", winter_9am)
    assert book.is_open("ny", summer_9am)
    assert not book.is_open("ny", summer_9am - 60)
    assert book.is_open("always", summer_9am - 60)
    assert book.has_hours("ny") and not book.has_hours("always")
