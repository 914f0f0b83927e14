"""The files a git diff touches, read from its headers, with git's quoted paths decoded.

git C-quotes a path that holds a double quote, a backslash, a control character or (with
core.quotePath, the default) a byte above 0x7f: `diff --git "a/caf\\303\\251.py" "b/caf\\303\\251.py"`.
git's own messages (`patch failed: café.py:3`) name the decoded path, so a patch's files are
compared with them decoded."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}
_OCTAL = re.compile(r"[0-3][0-7]{2}")
_EXTENDED = re.compile(r"^(rename from|rename to|copy from|copy to|new file mode|deleted file mode) ?(.*)$")


@dataclass(frozen=True)
class FileDiff:
    old: str | None  # None: the diff creates the file
    new: str | None  # None: the diff deletes it
    hunks: tuple[str, ...] = ()  # its `@@ … @@` lines, in order

    @property
    def path(self) -> str:
        """The file's name after the diff (before it, for a deletion)."""
        return self.new if self.new is not None else self.old

    @property
    def created(self) -> bool:
        """A new file, or a rename's or copy's target."""
        return self.new is not None and self.new != self.old


def file_diffs(text: str) -> list[FileDiff]:
    """One FileDiff per `diff --git` block of `text` (a format-patch file or `git diff` output)."""
    diffs = []
    for block in re.split(r"^(?=diff --git )", text, flags=re.M)[1:]:
        lines = block.split("\n")
        old, new = _header_names(lines[0].removeprefix("diff --git "))
        hunks, in_hunks, created, deleted = [], False, False, False
        for line in lines[1:]:
            if line.startswith("@@"):
                in_hunks = True
                hunks.append(line)
            elif in_hunks:
                continue  # a hunk's body: `--- x` there is a removed line `-- x`
            elif line.startswith(("--- ", "+++ ")):
                name = _side(line[4:])
                if name is None:  # /dev/null: the other side only
                    created, deleted = created or line[0] == "-", deleted or line[0] == "+"
                elif line[0] == "-":
                    old = name
                else:
                    new = name
            elif match := _EXTENDED.match(line):
                kind, value = match.groups()
                if kind.endswith("from"):
                    old = unquote(value)
                elif kind.endswith(" to"):
                    new = unquote(value)
                elif kind == "new file mode":
                    created = True
                else:
                    deleted = True
        diffs.append(FileDiff(None if created else old, None if deleted else new, tuple(hunks)))
    return diffs


def unquote(name: str) -> str:
    """A path as git printed it, C-quoted or not, decoded (bytes that are no UTF-8 kept as
    surrogate escapes, as os.fsdecode keeps them)."""
    if not (len(name) >= 2 and name[0] == name[-1] == '"'):
        return name
    raw, body, i = bytearray(), name[1:-1], 0
    while i < len(body):
        char = body[i]
        if char != "\\" or i + 1 == len(body):
            raw += char.encode("utf-8", "surrogateescape")
            i += 1
        elif _OCTAL.match(body, i + 1):
            raw.append(int(body[i + 1:i + 4], 8))
            i += 4
        else:
            raw.append(_ESCAPES.get(body[i + 1], ord(body[i + 1])))
            i += 2
    return raw.decode("utf-8", "surrogateescape")


def _side(token: str) -> str | None:
    """The path of a `---`/`+++` line's value (`a/x`, `"b/x"`, `/dev/null`); git adds a tab after a
    name that holds a space."""
    if token.startswith('"'):
        token = token[:_closing_quote(token) + 1]
    else:
        token = token.split("\t", 1)[0]
    if token == "/dev/null":
        return None
    return _strip_prefix(unquote(token))


def _header_names(rest: str) -> tuple[str, str]:
    """Both names of a `diff --git` line; ambiguous for unquoted names with ` b/` in them, which
    the `---`/`+++` or rename lines that follow settle (a mode-only change has the same name twice)."""
    if rest.startswith('"'):
        end = _closing_quote(rest)
        return _strip_prefix(unquote(rest[:end + 1])), _strip_prefix(unquote(rest[end + 2:]))
    if rest.endswith('"') and ' "' in rest:
        start = rest.rindex(' "')
        return _strip_prefix(rest[:start]), _strip_prefix(unquote(rest[start + 1:]))
    half = (len(rest) - 1) // 2  # "a/X b/X": the same name twice
    if rest[half:half + 1] == " " and rest[:half].removeprefix("a/") == rest[half + 1:].removeprefix("b/"):
        return _strip_prefix(rest[:half]), _strip_prefix(rest[half + 1:])
    old, _, new = rest.partition(" b/")
    return _strip_prefix(old), new


def _closing_quote(text: str) -> int:
    i = 1
    while i < len(text) - 1 and text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return min(i, len(text) - 1)


def _strip_prefix(name: str) -> str:
    return name[2:] if name[:2] in ("a/", "b/") else name
