"""Finding and reading the CSV files of an OMOP CDM export, streamed.

A source is a folder (searched recursively), a ``.zip`` (as Eunomia ships it), or a single table
file. Table files are ``<table>.csv`` or ``<table>.csv.gz`` in any letter case (``PERSON.csv``,
``person.csv.gz``); macOS resource forks (``__MACOSX/``, ``._*``) and hidden files are ignored.
Files are opened one at a time and read row by row: nothing is read whole into memory.

Comma-separated files with ``"`` quoting are the norm (OHDSI exports, Eunomia). A file whose
header line has tabs and no commas is read as tab-separated without quoting, which is the format
of vocabulary downloads from OHDSI Athena (``CONCEPT.csv`` etc.).
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from fedtwin.errors import FedTwinError

# Table values are long free text (concept names, sig, note_text): allow big fields.
csv.field_size_limit(1 << 30)

_SUFFIXES = (".csv.gz", ".csv", ".tsv.gz", ".tsv", ".txt.gz", ".txt")
# Errors that mean "this file cannot be read" (corrupt zip/gzip member, bad encoding, bad CSV).
READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, csv.Error, zipfile.BadZipFile, zlib.error)


class SourceError(FedTwinError):
    """The CSV source cannot be found, opened or read."""


@dataclass(frozen=True)
class SourceFile:
    """One file of the source. ``name`` is its path inside the source, as shown to the user."""

    name: str
    stem: str  # lower-case name without directory and data suffix: "person" for PERSON.csv.gz
    is_data: bool  # has a CSV-like suffix
    gzipped: bool
    _opener: Callable[[], BinaryIO]

    def open_binary(self) -> BinaryIO:
        raw = self._opener()
        return gzip.GzipFile(fileobj=raw, mode="rb") if self.gzipped else raw  # type: ignore[return-value]


def _describe(path_name: str, opener: Callable[[], BinaryIO]) -> SourceFile:
    base = path_name.replace("\\", "/").rsplit("/", 1)[-1]
    lower = base.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix):
            return SourceFile(path_name, lower[: -len(suffix)], True, suffix.endswith(".gz"), opener)
    return SourceFile(path_name, lower.split(".", 1)[0], False, False, opener)


def _ignored(rel: str) -> bool:
    parts = rel.replace("\\", "/").split("/")
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


@contextmanager
def open_source(source: str | Path) -> Iterator[list[SourceFile]]:
    """The files of ``source`` (folder, .zip or single file), open for reading while in the block."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(
            f"OMOP source {path} does not exist",
            "pass --source a folder of CSV files, a .zip of them, or one <table>.csv file",
        )
    if path.is_dir():
        files = []
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if p.is_file() and not _ignored(rel):
                files.append(_describe(rel, lambda p=p: open(p, "rb")))
        yield files
        return
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SourceError(f"{path} is not a readable zip file: {exc}", "re-download or re-create the archive") from None
        with zf:
            files = [
                _describe(info.filename, lambda info=info: zf.open(info))
                for info in zf.infolist()
                if not info.is_dir() and not _ignored(info.filename)
            ]
            yield files
        return
    described = _describe(path.name, lambda: open(path, "rb"))
    if not described.is_data:
        raise SourceError(
            f"OMOP source {path} is neither a folder, a .zip nor a CSV file",
            "pass --source a folder of CSV files, a .zip of them, or one <table>.csv file",
        )
    yield [described]


@dataclass
class CsvStream:
    """A table file open for reading: its header (as written) and an iterator over data records.

    ``records`` yields ``(record_number, line_number, fields)``; record 1 is the first data row
    after the header, and line numbers count physical lines (quoted fields may span lines).
    """

    header: list[str]
    records: Iterator[tuple[int, int, list[str]]]
    delimiter: str


@contextmanager
def read_csv(file: SourceFile, encoding: str = "utf-8-sig") -> Iterator[CsvStream]:
    """Open ``file`` as CSV; read errors anywhere (header or rows) become :class:`SourceError`."""
    def fail(exc: BaseException, where: str) -> SourceError:
        detail = str(exc) or type(exc).__name__
        hint = (
            f"the file is not {encoding}; pass --encoding (e.g. latin-1) if it was exported in another encoding"
            if isinstance(exc, UnicodeDecodeError)
            else "check that the file is complete and uncorrupted (re-export or re-download it)"
        )
        return SourceError(f"cannot read {file.name} {where}: {detail}", hint)

    try:
        binary = file.open_binary()
    except READ_ERRORS as exc:
        raise fail(exc, "(opening it)") from None
    text = io.TextIOWrapper(binary, encoding=encoding, newline="")
    try:
        try:
            first = text.readline()
        except READ_ERRORS as exc:
            raise fail(exc, "(header line)") from None
        if "\t" in first and "," not in first:
            reader = csv.reader(itertools.chain([first], text), delimiter="\t", quoting=csv.QUOTE_NONE)
            delimiter = "\t"
        else:
            reader = csv.reader(itertools.chain([first], text))
            delimiter = ","
        try:
            header = next(reader, [])
        except READ_ERRORS as exc:
            raise fail(exc, "(header line)") from None

        def records() -> Iterator[tuple[int, int, list[str]]]:
            n = 0
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except READ_ERRORS as exc:
                    raise fail(exc, f"around data row {n + 1} (line {reader.line_num + 1})") from None
                if not fields:  # blank line
                    continue
                n += 1
                yield n, reader.line_num, fields

        yield CsvStream(header, records(), delimiter)
    finally:
        try:
            text.close()
        except READ_ERRORS:
            pass
