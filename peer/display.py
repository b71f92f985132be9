"""Text from someone else made safe to show: the one cleaner for terminals, log lines and pages. No torch.

    clean_display("\\x1b]0;PWNED\\x07 refused")     -> "]0;PWNED refused"
    clean_display(peer_name, 64)                    # cut to 64 characters once cleaned

A coordinator's error details and a peer's display name are chosen by whoever runs them; printed
raw, an escape sequence would retitle the volunteer's terminal, clear it or forge log lines. Both
the peer (gRPC status details, HTTP reasons) and the coordinator (names, notes, status rows) clean
such text here before showing or storing it.
"""

from __future__ import annotations

import re
import unicodedata

# unicode categories dropped from display text: C0/C1 controls (Cc: newlines, ESC of ANSI
# sequences), format characters (Cf: bidi overrides that reorder a terminal line), line and
# paragraph separators, surrogates, private use and unassigned code points
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_SPACES = re.compile(r"\s+")


def clean_display(text: str, max_chars: int | None = None) -> str:
    """Text safe to show in a terminal, a log line or a page: NFKC-normalised, no control or format
    characters, every run of whitespace one space, trimmed, then cut to `max_chars`."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(
        " " if c.isspace() else c
        for c in text
        if c.isspace() or unicodedata.category(c) not in _DROPPED_CATEGORIES
    )
    text = _SPACES.sub(" ", text).strip()
    return text if max_chars is None else text[:max_chars]
