"""Character sets and JSON Schema `pattern`s (an ECMA-262 subset) as byte-level expressions.

A JSON string character is either raw UTF-8 of a code point a JSON string may hold unescaped (`SAFE`:
>= U+0020, not `"`, not `\\`, no surrogates) or an escape (`ESCAPE`: `\\"` `\\\\` `\\/` `\\b` `\\f` `\\n`
`\\r` `\\t`, or `\\uXXXX` of a non-surrogate code point). Either decodes to exactly one code point, so
`JSON_CHAR` repeated n times is a string of length n, as `minLength` / `maxLength` count.
Strings under a `pattern` or `format` are generated raw (no escapes): the pattern's character sets are
intersected with `SAFE`, so a pattern that needs another character (a quote, a newline) matches nothing.

Pattern subset: literals, `.`, escapes (\\d \\w \\s \\D \\W \\S \\t \\n \\r \\uXXXX \\xXX and escaped
punctuation), classes `[...]` with ranges and negation, groups `(...)` / `(?:...)`, `|`, quantifiers
`* + ? {n} {n,} {n,m}` (a lazy `?` suffix changes nothing for matching), `^` at the start and `$` at
the end. JSON Schema patterns are unanchored searches, so a missing `^` / `$` means any text may
come before / after. Anything else (backreferences, lookaround, `\\b`, inner anchors) raises
`PatternError`.
"""

from __future__ import annotations

from model.structured.regex import alt, byteset, lit, rep, seq

MAX_CP = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code point intervals


class PatternError(ValueError):
    """A pattern outside the supported subset; the message says which construct."""


def normalise(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def complement(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in normalise(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CP:
        out.append((nxt, MAX_CP))
    return out


def intersect(a: Ranges, b: Ranges) -> Ranges:
    return complement(complement(a) + complement(b))


SAFE = complement([(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), SURROGATES])
DIGIT: Ranges = [(0x30, 0x39)]
WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x2000, 0x200A), (0x3000, 0x3000)]


def _utf8_seq(lo: bytes, hi: bytes) -> tuple:
    """Byte sequences from `lo` to `hi` (same length, same-length UTF-8 encodings)."""
    n = len(lo)
    if n == 1:
        return byteset(range(lo[0], hi[0] + 1))
    if lo[0] == hi[0]:
        return seq(byteset([lo[0]]), _utf8_seq(lo[1:], hi[1:]))
    cont = byteset(range(0x80, 0xC0))
    lo_full, hi_full = all(b == 0x80 for b in lo[1:]), all(b == 0xBF for b in hi[1:])
    parts = []
    if not lo_full:
        parts.append(seq(byteset([lo[0]]), _utf8_seq(lo[1:], b"\xbf" * (n - 1))))
    first, last = lo[0] + (0 if lo_full else 1), hi[0] - (0 if hi_full else 1)
    if first <= last:
        parts.append(seq(byteset(range(first, last + 1)), *([cont] * (n - 1))))
    if not hi_full:
        parts.append(seq(byteset([hi[0]]), _utf8_seq(b"\x80" * (n - 1), hi[1:])))
    return alt(*parts)


def chars(ranges: Ranges) -> tuple:
    """Expression for one character from `ranges` (restricted to SAFE), as UTF-8 bytes."""
    parts = []
    for lo, hi in intersect(ranges, SAFE):
        for a, b in ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, MAX_CP)):
            x, y = max(lo, a), min(hi, b)
            if x <= y:
                parts.append(_utf8_seq(chr(x).encode(), chr(y).encode()))
    return alt(*parts)


ANY_CHAR = chars([(0, MAX_CP)])
_HEX_DIGIT = byteset(b"0123456789abcdefABCDEF")
ESCAPE = seq(
    lit(b"\\"),
    alt(
        byteset(b'"\\/bfnrt'),
        seq(
            lit(b"u"),
            alt(
                seq(byteset(b"0123456789abcefABCEF"), _HEX_DIGIT),
                seq(byteset(b"dD"), byteset(b"01234567")),  # not D800-DFFF: a lone surrogate is not text
            ),
            _HEX_DIGIT,
            _HEX_DIGIT,
        ),
    ),
)
JSON_CHAR = alt(ANY_CHAR, ESCAPE)

_CLASS_ESCAPES = {
    "d": DIGIT,
    "w": WORD,
    "s": SPACE,
    "D": complement(DIGIT),
    "W": complement(WORD),
    "S": complement(SPACE),
}
_CHAR_ESCAPES = {"t": 9, "n": 10, "r": 13, "f": 12, "v": 11, "0": 0}


class _Parser:
    def __init__(self, source: str):
        self.s, self.i = source, 0

    def peek(self) -> str | None:
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self) -> str:
        ch = self.s[self.i]
        self.i += 1
        return ch

    def fail(self, what: str) -> PatternError:
        return PatternError(f"pattern {self.s!r}: {what} at offset {self.i} is not supported")

    def parse(self) -> tuple:
        start = self.peek() == "^"
        if start:
            self.i += 1
        body = self.alternation()
        end = False
        if self.peek() == "$":
            self.i += 1
            end = True
        if self.i != len(self.s):
            raise self.fail(f"{self.peek()!r}")
        free = rep(ANY_CHAR, 0, None)
        return seq(*([] if start else [free]), body, *([] if end else [free]))

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return alt(*branches)

    def sequence(self) -> tuple:
        items = []
        while self.peek() not in (None, "|", ")") and not (self.peek() == "$" and self.i == len(self.s) - 1):
            items.append(self.quantified(self.atom()))
        return seq(*items)

    def atom(self) -> tuple:
        ch = self.take()
        if ch == "(":
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.fail("a lookaround or named group")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("an unclosed group")
            self.i += 1
            return inner
        if ch == "[":
            return chars(self.char_class())
        if ch == ".":
            return chars(complement([(10, 10), (13, 13), (0x2028, 0x2029)]))
        if ch == "\\":
            return chars(self.escape())
        if ch in "^$":
            raise self.fail("an anchor inside the pattern")
        if ch in "*+?{":
            raise self.fail("a quantifier without an atom")
        return chars([(ord(ch), ord(ch))])

    def escape(self) -> Ranges:
        if self.peek() is None:
            raise self.fail("a trailing backslash")
        ch = self.take()
        if ch in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[ch]
        if ch in _CHAR_ESCAPES:
            return [(_CHAR_ESCAPES[ch], _CHAR_ESCAPES[ch])]
        if ch in "ux":
            width = 4 if ch == "u" else 2
            digits = self.s[self.i : self.i + width]
            if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"a malformed \\{ch} escape")
            self.i += width
            return [(int(digits, 16), int(digits, 16))]
        if ch.isalnum():
            raise self.fail(f"the escape \\{ch}")
        return [(ord(ch), ord(ch))]

    def char_class(self) -> Ranges:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges: Ranges = []
        first = True
        while True:
            ch = self.peek()
            if ch is None:
                raise self.fail("an unclosed character class")
            if ch == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.class_atom()
            if self.peek() == "-" and self.s[self.i + 1 : self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_atom()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.fail("a range with a class escape")
                if lo[0][0] > hi[0][0]:
                    raise self.fail("a reversed range")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges += lo
        return complement(ranges) if negate else normalise(ranges)

    def class_atom(self) -> Ranges:
        ch = self.take()
        if ch == "\\":
            if self.peek() == "b":
                self.i += 1
                return [(8, 8)]
            return self.escape()
        return [(ord(ch), ord(ch))]

    def quantified(self, atom: tuple) -> tuple:
        ch = self.peek()
        if ch == "*":
            lo, hi = 0, None
        elif ch == "+":
            lo, hi = 1, None
        elif ch == "?":
            lo, hi = 0, 1
        elif ch == "{" and self._counted() is not None:
            lo, hi, width = self._counted()
            self.i += width - 1
        else:
            return atom
        self.i += 1
        if self.peek() == "?":  # lazy: same set of matches
            self.i += 1
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._counted()):
            raise self.fail("a nested quantifier")
        return rep(atom, lo, hi)

    def _counted(self) -> tuple[int, int | None, int] | None:
        close = self.s.find("}", self.i)
        if close < 0:
            return None
        body = self.s[self.i + 1 : close]
        lo_text, comma, hi_text = body.partition(",")
        if not lo_text.isdigit() or (hi_text and not hi_text.isdigit()):
            return None
        lo, hi = int(lo_text), (int(hi_text) if hi_text else None) if comma else int(lo_text)
        if hi is not None and hi < lo:
            raise self.fail("a quantifier {m,n} with n < m")
        if lo > 1000 or (hi or 0) > 1000:
            raise self.fail("a repetition count above 1000")
        return lo, hi, close - self.i + 1


def pattern(source: str) -> tuple:
    """Expression for the UTF-8 string bodies (unescaped) that contain a match of `source`."""
    return _Parser(source).parse()


# --- formats: regular subsets of what each format allows ------------------------------------------

_D = "[0-9]"
# years 0001-9999 (RFC 3339 allows 0000, but Python's date, which format checkers use, starts at year 1)
_YEAR = f"(?:{_D}{{3}}[1-9]|{_D}{{2}}[1-9]0|{_D}[1-9]00|[1-9]000)"
_DATE = (
    f"{_YEAR}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)"
    "|(?:0[13578]|1[02])-31)"
)
_TIME = f"(?:[01]{_D}|2[0-3]):[0-5]{_D}:[0-5]{_D}(?:\\.{_D}{{1,6}})?(?:Z|[+-](?:[01]{_D}|2[0-3]):[0-5]{_D})"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_HEX = "[0-9a-f]"
FORMATS = {
    "date": f"^{_DATE}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_DATE}T{_TIME}$",
    "email": "^[A-Za-z0-9._+-]{1,32}@[A-Za-z0-9-]{1,24}(?:\\.[A-Za-z0-9-]{1,24}){1,2}$",
    "uuid": f"^{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}$",
    "ipv4": f"^{_OCTET}(?:\\.{_OCTET}){{3}}$",
    "uri": "^https?://[a-z0-9-]{1,24}(?:\\.[a-z0-9-]{1,24}){0,3}(?:/[A-Za-z0-9._~-]{0,24}){0,4}$",
    "hostname": "^[a-z0-9](?:[a-z0-9-]{0,22}[a-z0-9])?(?:\\.[a-z0-9](?:[a-z0-9-]{0,22}[a-z0-9])?){0,3}$",
}


def literal_chars(text: str) -> tuple:
    """Expression for exactly `text` as raw UTF-8 (callers check it holds only SAFE characters)."""
    return lit(text.encode("utf-8"))
