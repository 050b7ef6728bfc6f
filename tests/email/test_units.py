"""Pure pieces: quote folding, HTML to text, reply tokens, composing, blob storage."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from hub.channels.blobs import BlobStore, BlobTooLarge
from hub.channels.email_compose import (
    OutgoingAttachment,
    compose,
    event_id_from_message_id,
    message_id_for,
    reply_subject,
)
from hub.channels.email_parse import parse_message
from hub.channels.email_text import fold, html_to_text
from hub.channels.email_token import make_token, reply_address, token_in_address, verify_token


def test_fold_original_message_and_signature() -> None:
    folded = fold(
        "Yes, please cancel it.\n\nThanks\n-- \nBob\nACME\n\n"
        "-----Original Message-----\nFrom: Support\nSent: Monday\n\nDo you want to cancel?"
    )
    assert folded.text == "Yes, please cancel it.\n\nThanks"
    assert folded.signature == "Bob\nACME"
    assert folded.quoted.startswith("-----Original Message-----")


def test_fold_keeps_inline_answers_between_quotes() -> None:
    text = "> Which plan?\nPro.\n> How many seats?\nFive."
    assert fold(text).text == text


def test_fold_never_leaves_nothing() -> None:
    text = "> only a quote\n> nothing else"
    folded = fold(text)
    assert folded.text == text and folded.quoted == ""


def test_fold_localized_attribution() -> None:
    folded = fold(
        "Merci !\n\nLe lun. 4 mars 2024 à 10:00, Support <s@x.example> a écrit :\n> Bonjour"
    )
    assert folded.text == "Merci !"
    assert folded.quoted.startswith("Le lun. 4 mars")


def test_html_to_text_blockquotes_become_quotes() -> None:
    text = html_to_text(
        "<div>Thanks!</div><div>On Mon, Jan 1, 2024 X wrote:</div>"
        "<blockquote><p>Old text</p><blockquote>older</blockquote></blockquote>"
    )
    assert text == "Thanks!\nOn Mon, Jan 1, 2024 X wrote:\n\n> Old text\n>\n> > older"
    assert fold(text).text == "Thanks!"


def test_reply_tokens_verify_and_refuse_forgeries() -> None:
    secret = b"s" * 32
    token = make_token(secret, "01HQZZZZZZZZZZZZZZZZZZZZZZ")
    assert verify_token(secret, token) == "01HQZZZZZZZZZZZZZZZZZZZZZZ"
    assert verify_token(secret, token.lower()) == "01HQZZZZZZZZZZZZZZZZZZZZZZ"
    assert verify_token(b"x" * 32, token) is None
    forged = "01HQZZZZZZZZZZZZZZZZZZZZZY" + token[26:]
    assert verify_token(secret, forged) is None
    address = reply_address("support@example.test", token)
    assert address == f"support+{token}@example.test"
    assert token_in_address("support@example.test", address.upper()) == token.upper()
    assert token_in_address("support@example.test", f"other+{token}@example.test") is None
    assert token_in_address("support@example.test", "support@example.test") is None


def test_message_ids_round_trip() -> None:
    mid = message_id_for("01HQZZZZZZZZZZZZZZZZZZZZZZ", "example.test")
    assert mid == "<01HQZZZZZZZZZZZZZZZZZZZZZZ@example.test>"
    assert event_id_from_message_id(mid, "EXAMPLE.test") == "01HQZZZZZZZZZZZZZZZZZZZZZZ"
    assert event_id_from_message_id(mid, "other.test") is None


def test_reply_subject() -> None:
    assert reply_subject("Re: RE: Fwd: Export") == "Re: Export"
    assert reply_subject("AW: Rechnung") == "Re: Rechnung"
    assert reply_subject("") == "Re: your message"


def test_compose_threads_and_escapes() -> None:
    refs = [f"<r{i}@x.example>" for i in range(30)]
    msg = compose(
        event_id="EVT",
        from_address="support@example.test",
        from_name="Example Support",
        to_address="casey@client.example",
        text="Hello <Casey> & co\n\nSecond paragraph",
        html_body=None,
        subject="Re: Question",
        message_id="<EVT@example.test>",
        references=refs,
        in_reply_to="<r29@x.example>",
        reply_to="support+tok@example.test",
        date=datetime(2024, 3, 5, tzinfo=UTC),
        attachments=[OutgoingAttachment("a.txt", "text/plain", b"file")],
    )
    parsed = parse_message(msg.as_bytes())
    assert parsed.message_id == "<EVT@example.test>"
    assert parsed.in_reply_to == ("<r29@x.example>",)
    assert len(parsed.references) == 20 and parsed.references[0] == "<r0@x.example>"
    assert parsed.references[-1] == "<r29@x.example>"
    assert msg["Reply-To"] == "Example Support <support+tok@example.test>"
    assert msg["X-Hub-Event-Id"] == "EVT"
    html = msg.get_body(preferencelist=("html",)).get_content()
    assert "Hello &lt;Casey&gt; &amp; co" in html and "<p>Second paragraph</p>" in html
    assert parsed.text == "Hello <Casey> & co\n\nSecond paragraph"
    assert [a.filename for a in parsed.attachments] == ["a.txt"]


def test_blob_store_is_content_addressed_and_size_limited(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", max_bytes=10)
    url = blobs.put(b"hello")
    assert url == blobs.put(b"hello")
    assert url.startswith("blob:") and blobs.get(url) == b"hello"
    with pytest.raises(BlobTooLarge):
        blobs.put(b"x" * 11)
    assert blobs.get("blob:../../etc/passwd") is None
    assert blobs.get("https://example.test/x") is None
