"""Personal data scrubbing: e-mail addresses, phone numbers, IP addresses and payment-card numbers become
typed placeholders (`<EMAIL>`, `<PHONE>`, `<IP_ADDRESS>`, `<CREDIT_CARD>`), so a model learns that
such a thing stood there without memorising it.

Precision matters as much as recall here: replacing every year, version number or ISBN would damage the
text. So each pattern is narrow and most are validated after matching:

- **E-mail**: local@domain with a dotted domain ending in an alphabetic TLD of 2+ letters.
- **IPv4**: four dotted octets 0-255 (no leading zeros), not part of a longer dotted number (so
  `10.0.19041.1` or `v1.2.3.4` stay). **IPv6**: a run of hex groups and colons, kept only when
  `ipaddress.IPv6Address` accepts it and it holds a digit (so `12:30:45`, MAC addresses and C++'s
  `a::b` stay).
- **Payment cards**: 13-19 digits, either contiguous or grouped as cards print them (4-4-4-4 with an
  optional short last group, Amex 4-6-5, Diners 4-6-4, one separator kind), a first digit 2-6 (the
  ISO/IEC 7812 major industry identifiers of card networks: 2/5 Mastercard, 3 Amex/Diners/JCB, 4 Visa,
  6 Discover/UnionPay; this leaves out ISBN-13/EAN codes, which start with 9), and a valid Luhn check
  digit (ISO/IEC 7812-1 Annex B).
- **Phones**: international numbers start with `+` and a country code and hold 8-15 digits in total
  (E.164 allows at most 15); North American numbers follow NANP (area code and exchange start with 2-9)
  in 3-3-4 groups that need a separator or parentheses, with an optional `+1`/`1` prefix. A bare run of
  digits is never a phone: it is as likely a count, an id or a timestamp, and dates (2021-03-15) and
  years do not fit the 3-3-4 shape.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>", "phone": "<PHONE>"}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])"
)
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:])(?!\.\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w)(?!\.\d)")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_PHONE_INTERNATIONAL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}(?!\w)(?![.-]\d)")
_PHONE_NANP = re.compile(
    r"(?<![\w+.,-])(?:\+?1[ .-]?)?(?:\([2-9]\d\d\) ?|[2-9]\d\d[ .-])[2-9]\d\d[ .-]\d{4}(?!\w)(?![.-]\d)"
)


def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) check: from the right, double every second digit (minus 9 when over 9), sum, % 10 == 0."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_layout_ok(match: str) -> bool:
    groups = re.split(r"[ -]", match)
    if len(groups) > 1:
        if len(set(re.findall(r"[ -]", match))) != 1:
            return False
        sizes = [len(g) for g in groups]
        four_fours = all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4
        if not (four_fours or sizes in ([4, 6, 5], [4, 6, 4])):
            return False
    return True


def is_credit_card(match: str) -> bool:
    """True for a 13-19 digit number laid out like a card, with a card-network first digit and a valid Luhn digit."""
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and _card_layout_ok(match) and luhn_valid(digits)


def _is_ipv6(candidate: str) -> bool:
    if not re.search(r"\d", candidate):  # `a::b`, `dead::beef` read as code or words more often than as addresses
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _is_international_phone(match: str) -> bool:
    return 8 <= sum(c.isdigit() for c in match) <= 15


_RULES = (  # (kind, pattern, validator); order matters: e-mails may hold digits, IPv6 may embed IPv4
    ("email", _EMAIL, None),
    ("ip", _IPV6, _is_ipv6),
    ("ip", _IPV4, None),
    ("credit_card", _CARD, is_credit_card),
    ("phone", _PHONE_INTERNATIONAL, _is_international_phone),
    ("phone", _PHONE_NANP, None),
)


def scrub_pii(text: str, counts: Counter | None = None) -> str:
    """`text` with personal data replaced by placeholders; replacements are tallied by kind into `counts`."""
    for kind, pattern, valid in _RULES:

        def replace(m: re.Match, kind: str = kind, valid=valid) -> str:
            if valid is not None and not valid(m.group()):
                return m.group()
            if counts is not None:
                counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text
