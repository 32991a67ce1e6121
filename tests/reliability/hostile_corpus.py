"""A corpus of hostile names: every one must be refused wherever a model, adapter, tag, revision or
file name is taken, with one clear line, and nothing written anywhere."""

from __future__ import annotations

_TRAVERSAL = [
    "", " ", ".", "..", "...", "../x", "../../etc/passwd", "x/..", "x/../..", "./x", "a/./b", "a/../b",
    "..\\x", "x\\..", "../models/tiny", "../../sentinel/owned", "tiny/../../sentinel",
    "con/../..", "..%2f", "....//", ".../", "..;/x",
]
_ABSOLUTE = [
    "/", "/etc/passwd", "/tmp", "/tmp/x", "//", "//server/share", "///x", "/dev/null", "/proc/self/environ",
    "~", "~root", "~/x", "~root/.ssh", "~/.cache/hyprstream/models/tiny",
]
_CONTROL = [
    "a\x00b", "\x00", "tiny\x00", "a\nb", "tiny\n", "\ntiny", "a\rb", "a\tb", "a\x1bb", "a\x7fb",
    "a\x1b[31mred", "a\x08b", "a\x0bb", "a\x0cb",
]
_REF_ILLEGAL = [
    "a..b", "@", "@{", "@{u}", "a@{1}", "tiny@{0}", "a.lock", "x.lock", "HEAD", "HEAD^", "HEAD~1", "a~1", "a^b",
    "a^{tree}", "a:b", "a?b", "a*b", "a[b", "a b", "a/b", "a/", "a//b", "/a", "a.", "a/.b", "-", "--",
    "refs/heads/main", "main@{yesterday}", "FETCH_HEAD", "ORIG_HEAD",
]
_OPTION_AND_DOT = [
    "-flag", "--help", "--home=/tmp/x", "-rf", "-n1", ".hidden", ".git", ".git/config", ".trash-x", "x.", "x/",
    ".lock",
]
_LONG = ["a" * 65, "a" * 300, "b" * 4096, "a/" * 200 + "x", "../" * 100 + "x", "x" * 255 + ".lock"]
_UNICODE = [
    "\uff0e\uff0e",            # fullwidth full stops
    "a\uff0fb",                # fullwidth solidus
    "a\u2215b",                # division slash
    "\u2024\u2024",            # one-dot leader x2
    "\u2025",                  # two-dot leader
    "m\u043edel",              # Cyrillic o
    "\u0442iny",               # Cyrillic te
    "tiny\u202e",              # right-to-left override
    "\u202egpj.exe",           # RTL override in front
    "ti\u200dny",              # zero-width joiner
    "tiny\u200b",              # zero-width space
    "\ufefftiny",              # byte order mark
    "na\u00efve",              # i with diaeresis
    "tin\u0079\u0301",          # combining accent
    "\uff54\uff49\uff4e\uff59",  # fullwidth "tiny"
    "a\u00a0b",                # no-break space
    "a\u3000b",                # ideographic space
    "\u2028",                  # line separator
    "a\ud800b",                # lone surrogate
    "\U0001f600",              # emoji
]
_WINDOWS = [
    "C:\\x", "C:x", "C:", "c:/windows", "\\\\server\\share", "\\\\?\\C:\\x", "\\x", "a\\b", "CON", "con",
    "NUL", "nul.txt", "PRN", "AUX", "COM1", "LPT1", "tiny:", "x::$DATA",
]
_RESERVED = ["working", "WORKING", "tmp", "cache", "Cache"]
_ENCODED = ["%2e%2e", "%2e%2e%2f", "%2F", "..%2F..%2F", "%00", "%0a", "tiny%00", "%252e%252e"]
_GLOB_SHELL = [
    "*", "?", "[a-z]", "{a,b}", "$(id)", "`id`", "a;rm -rf x", "a|b", "a&b", "a>b", "a<b", "$HOME",
    "${HOME}", "'", '"', "!", "a#b", "a b c", "\\", "a=b", "tiny'--",
]

HOSTILE: list[str] = list(dict.fromkeys(
    _TRAVERSAL + _ABSOLUTE + _CONTROL + _REF_ILLEGAL + _OPTION_AND_DOT + _LONG + _UNICODE + _WINDOWS
    + _RESERVED + _ENCODED + _GLOB_SHELL
))

# Hostile for a store name, yet fine as a git revision ('main', hex) or reserved only as a model: each
# entry point filters what it should refuse (see `refused_by`).
assert len(HOSTILE) >= 100, len(HOSTILE)


def printable(name: str) -> str:
    text = ascii(name)
    return text if len(text) <= 50 else text[:47] + "...'"


def argv_safe(name: str) -> bool:
    """Whether a real process can receive `name` in argv (no NUL, valid UTF-8 for the OS)."""
    if "\x00" in name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
