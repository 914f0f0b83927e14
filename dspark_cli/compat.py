"""compat.yaml: which upstream trees we support and how to get them, validated on load.

Validation walks the YAML node tree (not the constructed objects) so every error can name the
key path and its line: `compat.yaml:14: engines.vllm.pins.v0.32.0.commit: expected ...`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from dspark_cli.errors import PATH_SHAPE_ERRORS, EnvironmentProblem, UsageError

SCHEMA_VERSION = 1
HEX_COMMIT = re.compile(r"[0-9a-f]{7,40}")  # all patterns: fullmatch (`$` would allow a trailing newline)
FULL_COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A pin names the branch dspark/<pin>: a NAME without what git check-ref-format refuses of its
# characters ('..' anywhere, a '.' or '.lock' at the end).
PIN_NAME = re.compile(r"(?!.*\.\.)(?!.*\.lock\Z)[A-Za-z0-9][A-Za-z0-9._-]*(?<!\.)")
RELEASE_SUFFIXES = (".whl", ".tar.gz", ".zip")


class CompatError(UsageError):
    """compat.yaml is malformed (exit 2)."""


@dataclass(frozen=True)
class ReleaseFile:
    package: str
    version: str
    file: str
    sha256: str

    @property
    def kind(self) -> str:
        return "wheel" if self.file.endswith(".whl") else "sdist"


@dataclass(frozen=True)
class Pin:
    engine: str
    name: str
    commit: str
    tag: str
    patches: Path  # resolved series directory
    releases: tuple[ReleaseFile, ...]
    python: str
    torch: str
    cuda: str
    tested: dict = field(default_factory=dict)
    patches_key: str = "patches"  # where compat.yaml gives it: "FILE:LINE: engines.E.pins.P.patches"

    def series_dir(self) -> Path:
        """`patches` when it is a directory; a missing one is compat.yaml's error, named by file,
        line and key (read_series would name the path alone, like a bad --series)."""
        if not self.patches.is_dir():
            raise CompatError(f"{self.patches_key}: expected a series directory (relative to compat.yaml), "
                              f"{self.patches} is none")
        return self.patches

    @property
    def commit_is_full(self) -> bool:
        return bool(FULL_COMMIT.fullmatch(self.commit))

    def matches_commit(self, commit: str) -> bool:
        """True if `commit` (full or abbreviated) names this pin's commit."""
        commit = commit.lower()
        return len(commit) >= 7 and (self.commit.startswith(commit) or commit.startswith(self.commit))


@dataclass(frozen=True)
class Engine:
    name: str
    repository: str
    module: str
    distributions: tuple[str, ...]
    default_pin: str
    pins: dict[str, Pin]
    repository_line: int | None = None  # where compat.yaml writes it: checked only when a clone reads it

    def resolve_pin(self, ref: str | None) -> Pin | None:
        """The pin named by `ref`: its name, tag, or (short) commit, or a version without the tag's
        leading v (0.33.0 for v0.33.0, as pip spells it); the default pin for None."""
        if ref is None:
            return self.pins[self.default_pin]
        for pin in self.pins.values():
            if ref in (pin.name, pin.tag) or f"v{ref}" in (pin.name, pin.tag) or (
                    HEX_COMMIT.fullmatch(ref.lower()) and pin.matches_commit(ref)):
                return pin
        return None


@dataclass(frozen=True)
class Compat:
    path: Path
    engines: dict[str, Engine]

    def engine(self, name: str) -> Engine:
        if name not in self.engines:
            raise UsageError(f"unknown engine {name!r}; compat.yaml knows: {', '.join(self.engines)}")
        return self.engines[name]


def is_local_path(url: str) -> bool:
    """What git reads as a path on this machine: no scheme://, and no `host:` before the first slash
    (scp-like user@host:path)."""
    return "://" not in url and ":" not in url.split("/", 1)[0]


def default_path() -> Path:
    """$DSPARK_COMPAT, else the compat.yaml shipped in the package, else the checkout's."""
    if os.environ.get("DSPARK_COMPAT"):
        return Path(os.environ["DSPARK_COMPAT"])
    here = Path(__file__).resolve().parent
    for candidate in (here / "compat.yaml", here.parent / "compat.yaml"):
        if candidate.is_file():
            return candidate
    return here.parent / "compat.yaml"


def load(path: Path | None = None) -> Compat:
    path = Path(path) if path else default_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError) as exc:
        raise CompatError(f"{path}: cannot read: {exc}") from None  # a wrong path or not a text file: input
    except OSError as exc:  # permissions, I/O: the environment (README's exit 3); a path's shape: input
        if exc.errno in PATH_SHAPE_ERRORS:
            raise CompatError(f"{path}: cannot read: {exc}") from None
        raise EnvironmentProblem(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Compat:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CompatError(f"{path}{line}: not valid YAML: {problem}") from None
    except (ValueError, RecursionError) as exc:  # e.g. characters the reader rejects, absurd nesting
        raise CompatError(f"{path}: not valid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return _Validator(path).compat(root)


class _Validator:
    def __init__(self, path: Path):
        self.path = path
        self.base = path.resolve().parent

    def fail(self, node, key_path: str, expected: str, got: str | None = None):
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        if got is not None:  # the caller's own words for what is there instead
            raise CompatError(f"{self.path}{line}: {self._where(key_path)}: expected {expected}, {got}")
        got = ""
        if isinstance(node, yaml.ScalarNode):
            got = f", got {node.value[:60]!r}"
        elif node is not None:
            got = f", got a {'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}"
        raise CompatError(f"{self.path}{line}: {self._where(key_path)}: expected {expected}{got}")

    @staticmethod
    def _where(key_path: str) -> str:
        return (key_path or "(top level)").encode("unicode_escape").decode("ascii")  # keys may hold newlines

    def mapping(self, node, key_path, required, optional=()) -> dict:
        """{key: value node} of a mapping with exactly the required keys (plus optional ones)."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key_path, "a mapping")
        result = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:null":
                self.fail(key_node, key_path, "string keys")
            key = key_node.value
            if key in result:
                self.fail(key_node, f"{key_path}.{key}".lstrip("."), "each key once")
            if required is not None and key not in required and key not in optional:
                known = ", ".join(list(required) + list(optional))
                self.fail(key_node, f"{key_path}.{key}".lstrip("."), f"one of the keys {known}")
            result[key] = value_node
        for key in required or ():
            if key not in result:
                self.fail(node, key_path, f"a key {key!r}",
                          got=f"which is missing (keys here: {', '.join(result) or 'none'})")
        return result

    def string(self, node, key_path, pattern=None, expected="a non-empty string") -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            self.fail(node, key_path, expected)
        value = node.value
        if not value.strip() or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(node, key_path, expected)
        if "\0" in value:  # a quoted "\0": no path, ref or URL can hold one (the OS refuses it)
            self.fail(node, key_path, f"{expected} without a NUL")
        return value

    def specifier(self, node, key_path) -> str:
        return self._parsable(node, key_path, SpecifierSet, InvalidSpecifier, "a version range such as '>=3.11'")

    def version(self, node, key_path) -> str:
        return self._parsable(node, key_path, Version, InvalidVersion, "a PEP 440 version such as 0.32.0")

    def _parsable(self, node, key_path, parse, invalid, expected) -> str:
        """A string `parse` accepts (packaging's SpecifierSet / Version)."""
        value = self.string(node, key_path, expected=expected)
        try:
            parse(value)
        except invalid:
            self.fail(node, key_path, expected)
        return value

    def sequence(self, node, key_path, expected) -> list:
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key_path, expected)
        return node.value

    def compat(self, root) -> Compat:
        if root is None:
            raise CompatError(f"{self.path}: empty file; expected keys 'schema' and 'engines'")
        top = self.mapping(root, "", ("schema", "engines"))
        if self.string(top["schema"], "schema", expected=f"schema {SCHEMA_VERSION}") != str(SCHEMA_VERSION):
            self.fail(top["schema"], "schema", f"schema {SCHEMA_VERSION}")
        engines_node = top["engines"]
        engines = self.mapping(engines_node, "engines", None)
        if not engines:
            self.fail(engines_node, "engines", "at least one engine")
        for key_node, _ in engines_node.value:  # named at the key: its line, and the name as it is
            if not NAME.fullmatch(key_node.value):
                self.fail(key_node, f"engines.{key_node.value}", "an engine name of letters, digits, '.', '_' or '-'")
        return Compat(
            path=self.path,
            engines={name: self.engine(name, node) for name, node in engines.items()},
        )

    def engine(self, name, node) -> Engine:
        where = f"engines.{name}"
        keys = self.mapping(node, where, ("repository", "module", "distributions", "default_pin", "pins"))
        pins_node = keys["pins"]
        pin_nodes = self.mapping(pins_node, f"{where}.pins", None)
        if not pin_nodes:
            self.fail(pins_node, f"{where}.pins", "at least one pin")
        for key_node, _ in pins_node.value:  # named at the key: its line, and the name as it is
            if not PIN_NAME.fullmatch(key_node.value):
                self.fail(key_node, f"{where}.pins.{key_node.value}", "a pin name of letters, digits, '.', '_' or '-' "
                          "that git takes as a branch name (no '..', no '.' or '.lock' at the end)")
        pins = {pin_name: self.pin(name, pin_name, pin_node) for pin_name, pin_node in pin_nodes.items()}
        default_pin = self.string(keys["default_pin"], f"{where}.default_pin")
        if default_pin not in pins:
            self.fail(keys["default_pin"], f"{where}.default_pin", f"one of the pins ({', '.join(pins)})")
        distributions = tuple(
            self.string(item, f"{where}.distributions[{i}]", NAME, "a package name")
            for i, item in enumerate(self.sequence(keys["distributions"], f"{where}.distributions", "a list of package names"))
        )
        repository = self.string(keys["repository"], f"{where}.repository", expected="a repository URL or path")
        if is_local_path(repository) and not repository.startswith("~") and not Path(repository).is_absolute():
            repository = str(self.base / repository)  # relative to this file, as `patches` is, not to the cwd
        return Engine(
            name=name,
            repository=repository,
            module=self.string(keys["module"], f"{where}.module", re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$"), "a Python module name"),
            distributions=distributions,
            default_pin=default_pin,
            pins=pins,
            repository_line=keys["repository"].start_mark.line + 1,
        )

    def pin(self, engine, name, node) -> Pin:
        where = f"engines.{engine}.pins.{name}"
        keys = self.mapping(
            node, where, ("commit", "tag", "patches", "releases", "python", "torch", "cuda", "tested")
        )
        commit = self.string(keys["commit"], f"{where}.commit", HEX_COMMIT, "a commit id of 7 to 40 lowercase hex digits")
        patches = self.string(keys["patches"], f"{where}.patches", expected="a series directory (relative to compat.yaml)")
        release_nodes = self.sequence(keys["releases"], f"{where}.releases", "a list of release files")
        tested_keys = self.mapping(keys["tested"], f"{where}.tested", None)
        return Pin(
            engine=engine,
            name=name,
            commit=commit,
            tag=self.string(keys["tag"], f"{where}.tag"),
            patches=(self.base / patches),
            releases=tuple(self.release(f"{where}.releases[{i}]", n) for i, n in enumerate(release_nodes)),
            python=self.specifier(keys["python"], f"{where}.python"),
            torch=self.specifier(keys["torch"], f"{where}.torch"),
            cuda=self.specifier(keys["cuda"], f"{where}.cuda"),
            tested={place: self.string(text, f"{where}.tested.{place}") for place, text in tested_keys.items()},
            patches_key=f"{self.path}:{keys['patches'].start_mark.line + 1}: {self._where(f'{where}.patches')}",
        )

    def release(self, where, node) -> ReleaseFile:
        keys = self.mapping(node, where, ("package", "version", "file", "sha256"))
        file_name = self.string(keys["file"], f"{where}.file", expected="a file name")
        if "/" in file_name or not file_name.endswith(RELEASE_SUFFIXES):
            self.fail(keys["file"], f"{where}.file", "a wheel or sdist file name (.whl, .tar.gz, .zip)")
        return ReleaseFile(
            package=self.string(keys["package"], f"{where}.package", NAME, "a package name"),
            version=self.version(keys["version"], f"{where}.version"),
            file=file_name,
            sha256=self.string(keys["sha256"], f"{where}.sha256", SHA256, "64 lowercase hex digits"),
        )


def replace_scalar(text: str, root_path_keys: list[str], new_value: str) -> str:
    """Rewrite one scalar in compat.yaml text in place, keeping comments and layout. Its tag and
    anchor stay (`!!str &c 5930acc24`: its aliases, `*c`, compose to the anchored node and follow
    the new value); a block scalar (`>-` and the value on the next line) keeps its header."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    for key in root_path_keys:
        node = next(v for k, v in node.value if k.value == key)
    start, end = _value_span(text, node)
    return text[:start] + new_value + text[end:]


def _value_span(text: str, node: yaml.ScalarNode) -> tuple[int, int]:
    """Where `node`'s value is written: its scalar token, after the tag and anchor the node's marks
    include; of a block scalar only the value's line (the token holds the header, and a comment on
    it, and its end mark runs on past the line break, into the next line's indentation)."""
    token = next(t for t in yaml.scan(text, Loader=yaml.SafeLoader)
                 if isinstance(t, yaml.ScalarToken) and t.start_mark.index >= node.start_mark.index)
    start, end = token.start_mark.index, token.end_mark.index
    if token.style in ("|", ">"):
        end = start + len(text[start:end].rstrip())
        start = end - len(node.value)
    return start, end
