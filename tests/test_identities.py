import pytest

from hub.identities import InvalidIdentity, normalize
from hub.model import IdentityKind


def test_email_is_case_folded_and_trimmed() -> None:
    identity = normalize("email", "  Alice.Smith@Example.COM ")
    assert identity.kind is IdentityKind.EMAIL
    assert identity.value == "alice.smith@example.com"


def test_national_phone_numbers_use_the_default_region() -> None:
    assert normalize("phone", "(202) 555-0143", default_region="US").value == "+12025550143"
    assert normalize("phone", "06 12 34 56 78", default_region="FR").value == "+33612345678"
    # An international number ignores the default region.
    assert normalize("phone", "+44 20 7946 0958", default_region="US").value == "+442079460958"


@pytest.mark.parametrize(
    ("kind", "raw", "reason"),
    [
        ("email", "not-an-address", "not an email address"),
        ("email", "two@@example.com", "not an email address"),
        ("email", "a@b", "not an email address"),
        ("phone", "12", "phone number"),
        ("phone", "call me maybe", "not a phone number"),
        ("phone", "+1 555", "phone number"),
        ("chat", "short", "visitor id"),
        ("fax", "123", "unknown identity kind"),
    ],
)
def test_invalid_identities_get_a_readable_reason(kind: str, raw: str, reason: str) -> None:
    with pytest.raises(InvalidIdentity, match=reason):
        normalize(kind, raw, default_region="US")


def test_unverified_identity_keeps_its_flag() -> None:
    identity = normalize("email", "Bob@example.com", verified=False)
    assert identity.verified is False
    assert identity.key == "email:bob@example.com"
