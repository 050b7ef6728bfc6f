"""Schemathesis against the OpenAPI document the hub serves, on a real socket.

aiohttp is not ASGI, so the whole hub runs on a free loopback port (see `served_hub`)
and schemathesis loads GET /api/openapi.json from it, then sends generated requests to
every operation twice: with an admin's token (a fresh one per request, since one of the
operations is logout) and anonymously. Checks: no 5xx; every response whose status the
document describes with a schema conforms to that schema; and statuses and content types
are ones the document declares.

Path ids are real ones half of the time (a few customers and conversations are stored
first), so the 200 answers, not only the 404s, are held to their schemas.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from hub.app import INGESTOR
from hub.model import ChannelType, Identity, IdentityKind, Inbound
from tests.hostile.conftest import CHAT_CHANNEL, FUZZ, SMS_CHANNEL, ServedHub

# Beyond "no 5xx" and "bodies match their schemas": every status and content type the
# hub answers is one the document declares for that operation.
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
# Per operation and per run (admin, anonymous): about 30 operations, so a few hundred
# requests in all, well under a minute.
# Schemathesis draws with `random` inside its own strategies, which Hypothesis warns about.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

SETTINGS = settings(
    max_examples=max(5, FUZZ.max_examples // 4),
    deadline=None,
    derandomize=FUZZ.derandomize,
    database=FUZZ.database,
    suppress_health_check=list(HealthCheck),
)
REQUEST_TIMEOUT = 10


async def _seed(served: ServedHub) -> dict[str, list[str]]:
    """A few customers with conversations on two channels, as channels would store them."""
    ingestor = served.app[INGESTOR]
    customers: list[str] = []
    conversations: list[str] = []
    for i in range(3):
        chat = await ingestor.ingest(
            Inbound(
                channel=CHAT_CHANNEL,
                channel_type=ChannelType.WEBCHAT,
                external_id=f"schema-visitor-{i}:1",
                identity=Identity(IdentityKind.CHAT, f"schema-visitor-{i}"),
                text=f"hello {i}",
                display_name=f"Visitor {i}",
            )
        )
        sms = await ingestor.ingest(
            Inbound(
                channel=SMS_CHANNEL,
                channel_type=ChannelType.SMS,
                external_id=f"SMschema{i}",
                identity=Identity(IdentityKind.PHONE, f"+1415555020{i}"),
                text=f"text {i}",
            )
        )
        for recorded in (chat, sms):
            customers.append(recorded.event.customer_id)
            assert recorded.event.conversation_id is not None
            conversations.append(recorded.event.conversation_id)
    return {"customers": customers, "conversations": conversations}


@pytest.fixture(scope="module")
def api_schema(served_hub: ServedHub) -> Any:
    ids = served_hub.run(_seed(served_hub))
    schema = schemathesis.openapi.from_url(f"{served_hub.base_url}/api/openapi.json")

    @schema.hook
    def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
        # Random ids only ever reach the 404 branch; real ones reach the handlers' work.
        path = context.operation.path
        kind = "customers" if path.startswith("/api/v1/customers/") else "conversations"
        if not isinstance(path_parameters, dict) or "id" not in path_parameters:
            return st.just(path_parameters)
        return st.one_of(
            st.just(path_parameters),
            st.sampled_from(ids[kind]).map(lambda real: {**path_parameters, "id": real}),
        )

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@SETTINGS
def test_api_as_admin(case: Any, served_hub: ServedHub) -> None:
    token = served_hub.token("root")
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
    case.call_and_validate(
        headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=REQUEST_TIMEOUT
    )


@schema.parametrize()
@SETTINGS
def test_api_anonymous(case: Any) -> None:
    if case.headers:
        case.headers.pop("Authorization", None)
    case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT)


def test_document_is_served_and_lists_every_api_route(served_hub: ServedHub) -> None:
    """The document schemathesis reads is the one the app serves, for every /api/v1 route."""
    from hub.inbox.openapi import openapi_document, registered_operations

    document = openapi_document(served_hub.app)
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert set(registered_operations(served_hub.app)) <= documented
