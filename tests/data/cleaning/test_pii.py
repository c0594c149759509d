"""PII scrubbing: typed placeholders for real personal data, and nothing else touched."""

from collections import Counter

import pytest

from lmforge.data.cleaning.pii import is_credit_card, luhn_valid, scrub_pii


def scrub(text: str) -> tuple[str, Counter]:
    counts = Counter()
    return scrub_pii(text, counts), counts


@pytest.mark.parametrize(
    "text, expected",
    [
        ("write to jane.doe+news@mail.example.co.uk today", "write to <EMAIL> today"),
        ("Contact: J_Smith@example.org.", "Contact: <EMAIL>."),
        ("call +44 20 7946 0958 now", "call <PHONE> now"),
        ("call +33 1 23 45 67 89", "call <PHONE>"),
        ("call +1 (415) 555-2671", "call <PHONE>"),
        ("call (415) 555-2671 or 415-555-2671", "call <PHONE> or <PHONE>"),
        ("call 415.555.2671 or 1-800-555-0199", "call <PHONE> or <PHONE>"),
        ("host 192.168.0.1 is up", "host <IP_ADDRESS> is up"),
        ("from 8.8.8.8, to 255.255.255.255.", "from <IP_ADDRESS>, to <IP_ADDRESS>."),
        ("v6 2001:db8:85a3::8a2e:370:7334 here", "v6 <IP_ADDRESS> here"),
        ("loopback ::1 and fe80::1.", "loopback <IP_ADDRESS> and <IP_ADDRESS>."),
        ("mapped ::ffff:192.0.2.128 ok", "mapped <IP_ADDRESS> ok"),
        ("visa 4111 1111 1111 1111 ok", "visa <CREDIT_CARD> ok"),
        ("mc 5555-5555-5555-4444", "mc <CREDIT_CARD>"),
        ("amex 378282246310005 and 3782 822463 10005", "amex <CREDIT_CARD> and <CREDIT_CARD>"),
        ("visa13 4222222222222", "visa13 <CREDIT_CARD>"),
    ],
)
def test_personal_data_becomes_a_typed_placeholder(text, expected):
    assert scrub(text)[0] == expected


@pytest.mark.parametrize(
    "text",
    [
        "On 2021-03-15, at 12:30:45, in 1999 and 2000-2004.",  # dates, times, years
        "Python 3.11.4, Windows 10.0.19041.1, v1.2.3.4, release 2.0.0-rc1",  # version numbers
        "ISBN 978-3-16-148410-0, ISBN 0-306-40615-2, EAN 9783161484193",  # ISBNs (9783161484193 passes Luhn)
        "order 4111 1111 1111 1112 and 1234567812345678",  # 16 digits failing Luhn
        "hosts 999.1.1.1, 256.10.10.10, 1.2.3 and 10.0.0.256",  # invalid IPv4
        "times 12:30:45, MAC 00:1A:2B:3C:4D:5E, C++ std::vector, scope a::b",  # not IPv6
        "population 1,234,567,890 and id 1234567890 and 555-1234 and pi 3.14159265358979",  # plain numbers
        "user@localhost and @handle and a@b",  # no dotted domain
        "tel. 123-456-7890",  # not a NANP number: area codes and exchanges never start with 0 or 1
    ],
)
def test_lookalikes_are_left_alone(text):
    scrubbed, counts = scrub(text)
    assert scrubbed == text and not counts


def test_counts_are_tallied_by_kind():
    text = "a@b.com c@d.org 10.0.0.1 +49 30 901820 4111111111111111 fe80::1"
    scrubbed, counts = scrub(text)
    assert counts == Counter(email=2, ip=2, phone=1, credit_card=1)
    assert scrubbed == "<EMAIL> <EMAIL> <IP_ADDRESS> <PHONE> <CREDIT_CARD> <IP_ADDRESS>"


def test_luhn_matches_the_published_test_numbers():
    # Test card numbers published by the card networks pass; changing the last digit breaks the check.
    for number in ("4111111111111111", "5555555555554444", "378282246310005", "6011111111111117", "79927398713"):
        assert luhn_valid(number)
        assert not luhn_valid(number[:-1] + str((int(number[-1]) + 1) % 10))


def test_card_layout_must_look_like_a_card():
    assert is_credit_card("4111 1111 1111 1111") and is_credit_card("4111111111111111")
    assert not is_credit_card("4111 1111-1111 1111")  # mixed separators
    assert not is_credit_card("41 111111 1111 1111")  # not a card grouping
