"""Domain exceptions.

The library raises these; only the edges (CLI, HTTP) turn them into messages and exit codes.
Every message names the object, the reason and the fix, on one line.
"""

from __future__ import annotations

import unicodedata


_ESCAPED = {"Cc", "Zl", "Zp", "Cs"}  # control characters (newline, tab, a terminal's escape), line separators, a non-UTF-8 byte


def one_line(text: str) -> str:
    """`text` with each character that would break its line or the terminal (a newline in a file name, a byte of a
    non-UTF-8 name kept as a surrogate) written as its escape (`\\n`, `\\udcff`), so a message naming it stays on one
    line. Other text is kept as it is: an emoji's joiners and a right-to-left name's marks show as they should."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _ESCAPED else c for c in text)


class Spelled:
    """Something a message names that Python callers and command-line users write differently: a call to make
    (`Library.prune(missing=True)`, `prune --missing`) or an argument of another call than the one at fault."""

    def __init__(self, python: str, command: str) -> None:
        self.python, self.command = python, command

    def __repr__(self) -> str:
        return f"Spelled({self.python!r}, {self.command!r})"


REEMBED = Spelled("Library.open(FOLDER, reembed=True).index(PHOTO_DIRS)", "index PHOTO_DIR... --reembed")
"""Re-embed every image of a library with the model it records (its files changed since)."""
REEMBED_WITH = Spelled("Library.open(FOLDER, model=M, reembed=True).index(PHOTO_DIRS)", "index PHOTO_DIR... --reembed --model M")
"""Re-embed every image of a library with another model M."""
STORE_VIT = Spelled("Library.index(PHOTO_DIRS, store_vit=True)", "index PHOTO_DIR... --store-vit")
"""Store the ViT tokens of a library's photos, for reranking without rerunning the ViT."""
OPEN_FOLDER = Spelled("Library.open(FOLDER)", "--library FOLDER")
"""Name the folder of a library."""
PRUNE_MISSING = Spelled("Library.prune(missing=True)", "prune --missing")
"""Forget the photos whose files are gone."""


def _worded(message: str, values: dict, name: str | None, commands: bool) -> str:
    """`message` with its `values` filled in, the argument called `name`, and with `commands` each `Spelled` call as
    the command line writes it (else as Python); a message without values or argument is taken as it is."""
    if name is None and not values:
        return one_line(message)

    def spelled(value):  # a note within the message (a reason) is worded alike
        if isinstance(value, Spelled):
            return value.command if commands else value.python
        return value.naming(commands=commands) if isinstance(value, _Worded) else value

    named = {} if name is None else {"argument": _Named(name)}
    return one_line(message.format(**{key: spelled(value) for key, value in values.items()}, **named))


class _Worded:
    """A message of the library whose words for an argument (`argument`) or a call (a `Spelled` value) depend on who
    reads it: it reads as Python; an edge words it its way with `naming`."""

    argument: str | None
    _message: str
    _values: dict

    def naming(self, name: str | None = None, *, commands: bool = False) -> str:
        """The message with the argument called `name` (default: its keyword): a keyword (`k`) given a value as `k=10`, an
        option (`-k`) as `-k 10`; with `commands`, each call it names as the command line writes it (`prune --missing`)."""
        return _worded(self._message, self._values, (name or self.argument) if self.argument else None, commands)


class Blip2SearchError(_Worded, Exception):
    """Base class: an error the user can fix, reported without a traceback (CLI exit code 2). Its message is one
    line whatever the paths or text it names (`one_line`).

    Raised with `argument` (the Python parameter at fault), `message` is a format string of `values` naming it as
    `{argument}`, or given a value as `{argument:VALUE}`; values that are `Spelled` name a call or another argument.
    It reads as Python (`rerank_k=16`, `Library.prune(missing=True)`), and an edge whose users know them by other
    names renders it with `naming` (the CLI: `--rerank-k 16`, `prune --missing`)."""

    def __init__(self, message: str, *, argument: str | None = None, **values) -> None:
        self.argument, self._message, self._values = argument, message, values
        super().__init__(_worded(message, values, argument, commands=False))

    def __str__(self) -> str:
        return one_line(super().__str__())


class Note(_Worded, str):
    """A note of a library answer (`SearchResult.notes`, `IndexReport.notes`, ...) that names an argument or a call,
    as a `Blip2SearchError`'s message does: the text reads as Python, `naming` words it for an edge."""

    def __new__(cls, message: str, *, argument: str | None = None, **values) -> "Note":
        note = super().__new__(cls, _worded(message, values, argument, commands=False))
        note.argument, note._message, note._values = argument, message, values
        return note


def worded(data, name_of=lambda argument: argument):
    """`data` (an answer's dict, list or text, as it goes out as JSON or a line) with each `Note` in it as an edge's
    users read it: its argument named `name_of(argument)`, and the calls it names as the command line writes them."""
    if isinstance(data, Note):
        return data.naming(name_of(data.argument) if data.argument else None, commands=True)
    if isinstance(data, dict):
        return {key: worded(value, name_of) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [worded(value, name_of) for value in data]
    return data


class _Named(str):
    """An argument's name in a message: `{argument}` is the name, `{argument:VALUE}` the name given VALUE."""

    def __format__(self, value: str) -> str:
        if not value:
            return str(self)
        if self.startswith("-"):  # an option's value as typed on a command line: `--sort date`, not `--sort 'date'`
            return f"{self} {value[1:-1] if len(value) > 1 and value[0] == value[-1] == chr(39) else value}"
        return f"{self}={value}"


class InvalidInputError(Blip2SearchError, ValueError):
    """An argument is out of range or malformed."""


class ModelNotFoundError(Blip2SearchError):
    """A model id or directory could not be resolved to local files."""


class ModelLoadError(Blip2SearchError):
    """Model files were found but are not a usable BLIP-2 checkpoint of the needed kind."""


class ImageDecodeError(Blip2SearchError):
    """One image could not be read or decoded; other images are unaffected."""


class LibraryError(Blip2SearchError):
    """A photo library on disk is missing, unreadable, locked or inconsistent."""


class ModelMismatchError(LibraryError):
    """A library was built with a different model than the one asked for."""


class DamagedDatabaseError(LibraryError):
    """The library's SQLite file is damaged: pages SQLite finds malformed, or values in it that this program never
    writes (an unreadable date, text that is not UTF-8). Nothing is written to it after this is raised."""


class CorruptIndexError(LibraryError):
    """The vector index file returned impossible scores (damaged on disk); it can be rebuilt from the database."""


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `Library.index` after it had committed what it had done: `report` says what
    (`interrupted` True). A KeyboardInterrupt, so a script stops as at any Ctrl-C; run again to resume."""

    def __init__(self, report) -> None:
        super().__init__("index run interrupted: what was committed is kept; run it again to resume")
        self.report = report
