"""File-system names derived from run names (results and state directories)."""
from __future__ import annotations

import hashlib
import re

_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_MAX_ESCAPED = 200  # escaped names longer than this are shortened (file names have a 255-byte limit)
_ESCAPED_RE = re.compile(r"%[0-9A-F]{2}")


def run_dirname(run: str) -> str:
    """An injective, path-safe directory name for `run`: safe characters kept, every other byte written %XX.

    Run names come from the network: the name must not escape the results directory ("../x", "/etc")
    and two distinct runs must never share a directory (the old sanitiser mapped "a b" and "a_b" to
    related names sharing state). Ordinary names ("my-run", "gpt2_124M") stay as they are. A leading
    "." is escaped too (no hidden, "." or ".." directories). A name whose escaped form is longer than
    200 bytes becomes its escaped prefix + "~" + 160 bits of the SHA-256 of the name: "~" never appears in
    an escaped name (it is escaped itself), so the two forms cannot collide either.
    """
    out = []
    for i, ch in enumerate(run):
        if ch in _SAFE_CHARS and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    name = "".join(out) or "%"  # "" is not a valid run name; "%" alone is never produced otherwise
    if len(name) <= _MAX_ESCAPED:
        return name
    digest = hashlib.sha256(run.encode("utf-8", "surrogatepass")).hexdigest()[:40]  # 160 bits
    prefix = name[:50]
    cut = prefix.rfind("%", len(prefix) - 2)  # never cut an %XX escape in half
    return f"{prefix[:cut] if cut != -1 else prefix}~{digest}"


def run_from_dirname(name: str) -> str | None:
    """The run name a directory name came from (None for a shortened long name: only its hash is left)."""
    if "~" in name:
        return None
    data = bytearray()
    i = 0
    while i < len(name):
        if name[i] == "%" and _ESCAPED_RE.match(name, i):
            data += bytes([int(name[i + 1:i + 3], 16)])
            i += 3
        else:
            data += name[i].encode("utf-8")
            i += 1
    return data.decode("utf-8", "surrogatepass")
