"""The fixture corpus through the parser: text, folded quotes, HTML, attachments, charsets."""

from __future__ import annotations

import pytest

from hub.channels.email_parse import decode_text, message_ids, parse_message
from tests.email.conftest import FIXTURES


def parse(name: str):  # type: ignore[no-untyped-def]
    return parse_message((FIXTURES / name).read_bytes())


def test_outlook_reply_windows_1252_folds_the_from_sent_block() -> None:
    mail = parse("outlook_reply.eml")
    assert mail.from_address == "Maria@Contoso.example"
    assert mail.display_name == "María Fernández"
    assert mail.text.startswith("Hi Support team,\n\nThanks \u2013 the “export” button works now.")
    assert "please try again after clearing the cache" not in mail.text
    assert mail.quoted.startswith("________________________________\nFrom: Example Support")
    assert "please try again after clearing the cache." in mail.quoted
    assert mail.in_reply_to == ("<01HR2ABCDEF0123456789ABCDE@example.com>",)
    assert mail.html is not None and "<style" not in mail.html and "MsoNormal" not in mail.html
    assert mail.auto_reason is None and mail.attachments == ()


def test_gmail_reply_folds_wrapped_attribution_quotes_and_signature() -> None:
    mail = parse("gmail_reply.eml")
    assert mail.text == (
        "Hello,\n\nI still can't log in. The error says «invalid token». Screenshot is below 🙂"
    )
    assert mail.signature == "John Smith\nhttps://johnsmith.example"
    assert mail.quoted.startswith("On Mon, Mar 4, 2024 at 5:30")
    assert "> could you tell us which browser you use?" in mail.quoted
    # Nearest first: In-Reply-To, then References from the newest.
    assert mail.thread_refs == (
        "<CAK7xQ1b9z=abc@mail.gmail.com>",
        "<01HQZZZZZZZZZZZZZZZZZZZZZZ@example.com>",
    )
    assert mail.delivered_to == ("support@example.com",)


def test_apple_mail_reply_folds_sent_from_my_iphone() -> None:
    mail = parse("apple_mail_reply.eml")
    assert mail.text == (
        "Hej! The parcel never arrived \u2013 tracking says “delivered” but nothing is here. "
        "Can you check with the courier?"
    )
    assert mail.signature == "Sent from my iPhone"
    assert mail.quoted.startswith("> On 4 Mar 2024, at 16:20, Example Support")
    assert mail.message_id == "<9F3A1C2E-7B4D-4E8F-A1B2-3C4D5E6F7A8B@icloud.example>"


def test_inline_forward_keeps_the_forwarded_text() -> None:
    mail = parse("forwarded_inline.eml")
    assert mail.forwarded
    assert "Can you look at this? I paid it last week." in mail.text
    assert "invoice 2024-0031 is overdue" in mail.text
    assert mail.quoted == ""


def test_forward_as_attachment_keeps_the_original_as_eml() -> None:
    mail = parse("forwarded_attached.eml")
    assert mail.display_name == "Lee, Kim"
    assert mail.text == "See the attached mail from our user."
    [att] = mail.attachments
    assert att.content_type == "message/rfc822"
    assert att.filename == "Password reset not arriving.eml"
    assert b"I requested a reset three times" in att.data


@pytest.mark.parametrize(
    ("name", "subject", "expected"),
    [
        (
            "latin1_qp.eml",
            "Rückfrage zur Bestellung",
            "können Sie mir sagen, wann die Bestellung ankommt? Grüße aus Köln.",
        ),
        (
            "windows1252_8bit.eml",
            "Facture",
            "la facture indique “100 €” au lieu de 90 €. Pourriez-vous vérifier ?",
        ),
        ("utf8_base64.eml", "配送について", "注文番号 8842 の配送状況を教えてください。"),
    ],
)
def test_charsets_and_transfer_encodings(name: str, subject: str, expected: str) -> None:
    mail = parse(name)
    assert mail.subject == subject
    assert expected in mail.text


def test_headers_in_encoded_words() -> None:
    assert parse("latin1_qp.eml").display_name == "Jürgen Müller"
    assert parse("utf8_base64.eml").display_name == "山田太郎"


def test_broken_charset_decodes_with_a_fallback_and_no_message_id_hashes_the_bytes() -> None:
    raw = (FIXTURES / "broken_charset.eml").read_bytes()
    mail = parse_message(raw)
    assert mail.text == "café and ÿþ bytes"
    assert mail.message_id is None
    assert mail.external_id.startswith("sha256:") and len(mail.external_id) == 7 + 64
    assert parse_message(raw).external_id == mail.external_id  # stable: re-fetches dedupe


def test_html_only_is_sanitized_and_text_is_derived() -> None:
    mail = parse("html_only.eml")
    html = mail.html
    assert html is not None
    for bad in ("<script", "onload", "onerror", "javascript:", "<iframe", "<style", "<title"):
        assert bad not in html
    assert "<b>upgrade</b>" in html and 'href="https://docs.example/pricing"' in html
    assert mail.text == (
        "Hello,\n\nI'd like to upgrade my plan to Pro & pay yearly. Café pricing?\n\n"
        "click pricing page <https://docs.example/pricing>\n\n- Seats: 5\n- Billing: yearly"
    )


def test_attachments_with_rfc2231_names_and_no_paths() -> None:
    mail = parse("attachments.eml")
    assert mail.text == "Please find the documents attached."
    names = [(a.filename, a.content_type, len(a.data)) for a in mail.attachments]
    assert names == [
        ("claim.pdf", "application/pdf", 69),
        ("Rechnung März.pdf", "application/pdf", 75),
        ("scan.bin", "application/octet-stream", 4096),
    ]
    assert mail.attachments[0].data.startswith(b"%PDF-1.4")


def test_inline_image_is_an_attachment_with_its_content_id() -> None:
    mail = parse("inline_image.eml")
    [image] = mail.attachments
    assert image.content_type == "image/png" and image.inline
    assert image.content_id == "logo@studio.example"
    assert image.data.startswith(b"\x89PNG")
    assert mail.html is not None and 'src="cid:logo@studio.example"' in mail.html


def test_dsn_bounce_with_the_returned_message() -> None:
    mail = parse("bounce_dsn.eml")
    assert mail.auto_reason == "bounce"
    bounce = mail.bounce
    assert bounce is not None
    assert bounce.original_message_id == "<ORIGINAL-MESSAGE-ID@example.com>"
    assert bounce.original_event_id == "ORIGINAL-EVENT-ID"
    assert bounce.recipient == "nobody@nowhere.example"
    assert bounce.action == "failed" and bounce.status == "5.1.1"
    assert bounce.diagnostic == (
        "550 5.1.1 <nobody@nowhere.example>: Recipient address rejected: User unknown"
    )
    assert mail.attachments == ()  # the report's machinery is read, not kept as files


def test_dsn_bounce_with_returned_headers_only() -> None:
    bounce = parse("bounce_headers_only.eml").bounce
    assert bounce is not None
    assert bounce.original_message_id == "<HEADERS-ONLY-ID@example.com>"
    assert bounce.recipient == "gone@corp.example"
    assert bounce.diagnostic.startswith("550 5.1.10 RESOLVER.ADR.RecipientNotFound")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("out_of_office.eml", "auto-submitted: auto-replied"),
        ("precedence_bulk.eml", "precedence: bulk"),
        ("bounce_dsn.eml", "bounce"),
    ],
)
def test_machine_mail_is_recognized(name: str, reason: str) -> None:
    assert parse(name).auto_reason == reason


@pytest.mark.parametrize(
    "name",
    [
        "outlook_reply.eml",
        "gmail_reply.eml",
        "apple_mail_reply.eml",
        "forwarded_inline.eml",
        "latin1_qp.eml",
        "html_only.eml",
        "attachments.eml",
    ],
)
def test_people_are_not_machine_mail(name: str) -> None:
    assert parse(name).auto_reason is None


def test_x_autoreply_alone_marks_an_auto_reply() -> None:
    raw = b"From: a@b.example\r\nX-Autoreply: yes\r\nSubject: away\r\n\r\nAway.\r\n"
    assert parse_message(raw).auto_reason == "x-autoreply: yes"
    raw = b"From: a@b.example\r\nAuto-Submitted: no\r\nSubject: hi\r\n\r\nHi.\r\n"
    assert parse_message(raw).auto_reason is None


def test_garbage_never_raises() -> None:
    for raw in (
        b"",
        b"\x00\xff\xfe",
        b"From: <<<>>>\r\nContent-Type: multipart/mixed\r\n\r\n--x",
        b'Content-Type: text/plain; charset="\r\n\r\nbody',
    ):
        mail = parse_message(raw)
        assert mail.external_id.startswith("sha256:")


def test_decode_text_fallbacks() -> None:
    assert decode_text("naïve".encode(), None) == "naïve"  # no label: UTF-8 first
    assert decode_text(b"\x93hi\x94", "iso-8859-1") == "“hi”"  # read as Windows-1252
    assert decode_text(b"caf\xe9", "us-ascii") == "café"
    assert decode_text(b"\xff", "utf-8") == "\ufffd"
    # A label no codec can have (found by fuzzing): the fallbacks, not a crash.
    assert decode_text("naïve".encode(), "utf-8\x00") == "naïve"
    assert decode_text(b"caf\xe9", "x\x00y") == "café"


def test_message_ids() -> None:
    assert message_ids("<a@b> <c@d>\r\n <a@b>") == ("<a@b>", "<c@d>")
    assert message_ids("bare@id") == ("<bare@id>",)
    assert message_ids("") == ()
