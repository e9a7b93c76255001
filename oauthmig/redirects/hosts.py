"""What browsers and resolvers make of a URI's host, for the redirect rules.

RFC 3986 alone accepts hosts that a browser reads differently or that no resolver can look up.
These pure functions answer the three questions the rules ask:

* :func:`encoded_host_problem`: does a percent-encoded host decode to a delimiter, a control
  character or an internationalized name (RU001)? A component that percent-decodes the host
  (every browser does, WHATWG URL "host parsing" step 4) sees another authority or another name.
* :func:`browser_ipv4`: would a WHATWG URL parser (what browsers follow) read the host as an IPv4
  address, and which one? Implements the "ends in a number" checker and the IPv4 parser of the
  WHATWG URL Standard §3.5, so ``127.1``, ``0x7f000001``, ``2130706433`` and ``0177.0.0.1`` all
  give ``127.0.0.1`` (RU017), and ``256.256.256.256`` gives a failure (RU018).
* :func:`dns_host_problem`: is a registered name one DNS and IDNA accept (RU018)? Labels of 1-63
  characters, at most 253 in all (RFC 1034 §3.1, RFC 1123 §2.1), no leading or trailing hyphen
  (RFC 952, RFC 1123 §2.1, RFC 5891 §4.2.3.1), A-labels that are valid IDNA2008 (RFC 5890
  §2.3.2.1, RFC 5891 §5.4).

The IDNA policy is IDNA2008 (RFC 5891) after the UTS #46 mapping (non-transitional), through the
``idna`` package: the mapping is what browsers apply to what users type, IDNA2008 decides what
may be registered. Hosts are expected lowercase (as
:func:`oauthmig.uri.normalize_host` leaves them).
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import idna

__all__ = [
    "a_label_form",
    "browser_ipv4",
    "dns_host_problem",
    "encoded_host_problem",
    "ends_in_a_number",
    "ipv4_text",
    "non_ascii_host_hint",
]

_PCT_TRIPLET = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_CONTROL_NAMES = {0x00: "NUL", 0x09: "tab", 0x0A: "line feed", 0x0D: "carriage return"}
_MAX_NAME = 253
_MAX_LABEL = 63
# RFC 3986 Appendix B, to find the authority of a value that does not parse.
_SPLIT = re.compile(r"(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.S)


def _describe(char: str) -> str:
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return f"the control character {_CONTROL_NAMES.get(code, f'U+{code:04X}')}"
    if code == 0x20:
        return "a space"
    return f"'{char}'"


# --------------------------------------------------------------------------- WHATWG IPv4


def _ipv4_number(part: str) -> int | None:
    """The WHATWG "IPv4 number parser": decimal, ``0x`` hex or ``0``-prefixed octal."""
    if not part:
        return None
    radix = 10
    if len(part) >= 2 and part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) >= 2 and part[0] == "0":
        part, radix = part[1:], 8
    if not part:
        return 0
    digits = {10: "0123456789", 16: "0123456789abcdefABCDEF", 8: "01234567"}[radix]
    if any(c not in digits for c in part):
        return None
    if len(part) > 40:  # far beyond 2**32 in any radix; keeps int() cheap
        return 2**64
    return int(part, radix)


def ends_in_a_number(host: str) -> bool:
    """The WHATWG URL "ends in a number" checker: whether a browser hands ``host`` to its IPv4
    parser (the last label, ignoring one trailing dot, is digits or an IPv4 number)."""
    parts = host.split(".")
    if parts[-1] == "":
        if len(parts) == 1:
            return False
        parts.pop()
    last = parts[-1]
    if last and all("0" <= c <= "9" for c in last):
        return True
    return _ipv4_number(last) is not None


def browser_ipv4(host: str) -> int | None:
    """The WHATWG URL IPv4 parser: the address a browser reads ``host`` as, or None when it
    fails (then a browser rejects the URL). Only meaningful when :func:`ends_in_a_number`."""
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4:
        return None
    numbers: list[int] = []
    for part in parts:
        number = _ipv4_number(part)
        if number is None:
            return None
        numbers.append(number)
    if any(n > 255 for n in numbers[:-1]):
        return None
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        return None
    address = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        address += n * 256 ** (3 - i)
    return address


def ipv4_text(address: int) -> str:
    """The dotted-quad serialization of a 32-bit address."""
    return ".".join(str((address >> shift) & 0xFF) for shift in (24, 16, 8, 0))


# --------------------------------------------------------------------------- IDNA


def a_label_form(name: str) -> tuple[str | None, str | None]:
    """``(browser_form, idna2008_error)`` of an internationalized host name.

    ``browser_form`` is the ASCII name after the UTS #46 mapping (non-transitional) and
    Punycode, which is where a browser goes (None when the mapping itself rejects a code
    point). ``idna2008_error`` is None when every non-ASCII label is a valid IDNA2008 U-label
    (RFC 5891), else the reason.
    """
    try:
        mapped = idna.uts46_remap(name, std3_rules=False, transitional=False)
    except ValueError as exc:  # idna.IDNAError, or a code point it cannot map
        return None, str(exc) or "not a valid name"
    labels = mapped.split(".")
    ascii_labels: list[str] = []
    error: str | None = None
    for label in labels:
        if label.isascii():
            ascii_labels.append(label)
            continue
        ascii_labels.append("xn--" + label.encode("punycode").decode("ascii"))
        if error is None:
            try:
                idna.alabel(label)
            except ValueError as exc:  # idna.IDNAError is a UnicodeError
                error = str(exc) or "not a valid U-label"
    return ".".join(ascii_labels), error


def _with_host(raw: str, old: str, new: str) -> str | None:
    """``raw`` with its host ``old`` replaced by ``new`` (first occurrence after ``//``)."""
    start = raw.find("//")
    if start < 0:
        return None
    at = raw.find(old, start + 2)
    if at < 0:
        return None
    return raw[:at] + new + raw[at + len(old) :]


def _idn_message(shown: str, name: str, raw: str, host_text: str) -> str:
    browser, error = a_label_form(name)
    if browser is None:
        return f"{shown}; no browser accepts it ({error})"
    if browser.isascii() and ends_in_a_number(browser):
        address = browser_ipv4(browser)
        target = "no address" if address is None else ipv4_text(address)
        return f"{shown}; a browser reads it as {browser} ({target})"
    if error is not None:
        return (
            f"{shown}; a browser would go to {browser}, but the name is not valid IDNA2008 "
            f"({error}), so it cannot be registered"
        )
    suggestion = _with_host(raw, host_text, browser) or browser
    if "xn--" not in browser:
        return f"{shown}; a browser maps it to {browser} (UTS #46); write {suggestion}"
    return f"{shown}; redirect URIs carry the IDNA A-label (UTS #46, IDNA2008): {suggestion}"


def encoded_host_problem(host: str, raw: str, *, idn: bool) -> str | None:
    """RU001: a reg-name ``host`` (as written) whose percent-encodings decode to anything but
    unreserved characters: a delimiter, ``%``, a space or a control character (any component
    that decodes the host sees another authority), or, when ``idn``, bytes of an
    internationalized name (reported with the A-label a browser would use). ``%2A`` is left to
    RU004. ``raw`` is the whole URI, for the suggestion."""
    if "%" not in host:
        return None
    non_ascii = False
    for match in _PCT_TRIPLET.finditer(host):
        byte = int(match.group(1), 16)
        if byte >= 0x80:
            non_ascii = True
            continue
        char = chr(byte)
        if char in _UNRESERVED or char == "*":
            continue
        return (
            f"host contains {match.group()}, which decodes to {_describe(char)}; a component "
            "that percent-decodes the host sees a different authority"
        )
    if not non_ascii or not idn:
        return None
    try:
        name = unquote_to_bytes(host).decode("utf-8")
    except UnicodeError:
        return "host percent-decodes to bytes that are not UTF-8; no browser can use it"
    return _idn_message(f"host percent-decodes to the name '{name}'", name, raw, host)


def non_ascii_host_hint(raw: str) -> str | None:
    """For a value that is not a URI because its host is not ASCII (an IRI such as
    ``https://bücher.example/cb``): the A-label advice to append to the RU001 reason."""
    m = _SPLIT.fullmatch(raw)
    if m is None or m.group(2) is None:
        return None
    hostport = m.group(2).rpartition("@")[2]
    if hostport.startswith("["):
        return None
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit():
        host = hostport
    if host.isascii() or not host or any(c in host for c in " \t\r\n%"):
        return None
    return _idn_message("the host is not ASCII", host, raw, host)


# --------------------------------------------------------------------------- DNS names


def _a_label_problem(label: str) -> str | None:
    try:
        ulabel = idna.ulabel(label)
    except ValueError as exc:  # idna.IDNAError is a UnicodeError
        return f"'{label}' is not a valid A-label (RFC 5891): {exc}"
    try:
        again = idna.alabel(ulabel).decode("ascii")
    except ValueError as exc:  # pragma: no cover - ulabel validated it
        return f"'{label}' is not a valid A-label (RFC 5891): {exc}"
    if again != label:
        return f"'{label}' is not the canonical A-label of '{ulabel}' ({again})"
    return None


def dns_host_problem(host: str) -> str | None:
    """RU018: why a lowercase ASCII registered name is not one DNS and IDNA accept, or None.

    One trailing dot (the DNS root) is allowed. Hosts that end in a number are the IPv4
    parser's business (:func:`browser_ipv4`), not this function's.
    """
    name = host[:-1] if host.endswith(".") else host
    if not name:
        return "the host has no labels"
    if len(name) > _MAX_NAME:
        return f"host name is {len(name)} characters; DNS allows at most {_MAX_NAME}"
    for label in name.split("."):
        if not label:
            return f"host '{host}' has an empty label"
        if len(label) > _MAX_LABEL:
            return (
                f"label '{label[:20]}...' is {len(label)} characters; DNS allows at most "
                f"{_MAX_LABEL}"
            )
        if label[0] == "-" or label[-1] == "-":
            return f"label '{label}' starts or ends with a hyphen"
        if label.startswith("xn--"):
            problem = _a_label_problem(label)
            if problem is not None:
                return problem
    return None
