"""Reading a user's CSV files: the one door every user CSV comes through.

The images CSV (``prepare images``), the IMPA metadata CSV, the three raw BBBC021 CSVs and a user's
embeddings CSV are all read here, so they share one set of rules and messages:

* the text must be UTF-8 (a leading byte-order mark is allowed, as Excel's "CSV UTF-8" writes it);
  any other encoding (Latin-1, Windows-1252 from an older Excel) is refused with one line naming the
  file, the line, the offending byte and the fix (:func:`text_lines`);
* the delimiter is the comma; a header that is ``;``- or tab-separated (Excel in many locales) is
  named as such instead of "missing column(s)" (:func:`delimiter_hint`);
* a missing file, a folder, an empty file, a missing column, a row with the wrong number of fields
  and a malformed line (say a NUL byte) are each one line naming the file (and line).

Lines are decoded one at a time, so a large CSV (IMPA's ~100k rows) streams in constant memory.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Iterator

from cellfluxrl.errors import CellfluxError

ENCODING = "UTF-8"
SAVE_AS_UTF8 = "save it as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)')"
OTHER_DELIMITERS = {";": "semicolon (;)", "\t": "tab"}


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CellfluxError(f"{path}: {'a folder, not a CSV file' if path.is_dir() else 'missing file'}")


def text_lines(path: str | os.PathLike) -> Iterator[str]:
    """Decode a user's CSV file line by line as UTF-8 (a leading byte-order mark is dropped).

    Args:
        path: the CSV file.

    Yields:
        str, each physical line with its line ending (as :func:`csv.reader` wants them).

    Raises:
        CellfluxError: the file is missing or a folder; a line that is not UTF-8, as
            ``"FILE line N: not UTF-8 text (byte 0xe9 at character C); save it as UTF-8 ..."``.
    """
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[:exc.start].decode("utf-8", errors="replace")) + 1
                raise CellfluxError(f"{path} line {number}: not {ENCODING} text (byte 0x{raw[exc.start]:02x} at "
                                    f"character {column}); {SAVE_AS_UTF8}") from None


def delimiter_hint(header_line: str, wanted: Iterable[str]) -> str:
    """``"; the file looks ;-separated: save it comma-separated"`` when the header splits on ``;`` or a
    tab into at least one of the ``wanted`` columns (and does not on the comma); else ``""``.

    Args:
        header_line: the CSV's first line as read.
        wanted: the column names the reader needs.
    """
    wanted = {w.strip().lower() for w in wanted}
    for sep, name in OTHER_DELIMITERS.items():
        cells = {c.strip().strip('"').lower() for c in header_line.strip("\r\n").split(sep)}
        if sep in header_line and cells & wanted:
            return f"; the file looks {name}-separated: save it comma-separated (the delimiter must be ',')"
    return ""


def read_header(path: str | os.PathLike, wanted: Iterable[str] = ()) -> list[str]:
    """The stripped column names of a CSV's first line.

    Raises:
        CellfluxError: missing or empty file, not UTF-8, or (with ``wanted``) one of ``wanted`` is
            missing (naming it, and a ``;``/tab delimiter when that is the cause).
    """
    path = Path(path)
    lines = text_lines(path)
    first = next(lines, None)
    lines.close()
    if first is None or not first.strip():
        raise CellfluxError(f"{path}: empty file (expected a header line of column names)")
    header = [h.strip() for h in next(csv.reader([first]))]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise CellfluxError(f"{path}: missing column(s) {', '.join(missing)}{delimiter_hint(first, wanted)}")
    return header


def csv_rows(path: str | os.PathLike, columns: tuple[str, ...],
             optional: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Stream ``(line number, {column: stripped value})`` of a user's CSV.

    Columns other than ``columns`` and ``optional`` (e.g. IMPA's index columns ``Unnamed: 0``) are
    ignored; an absent ``optional`` column is left out of the dicts. Blank lines are skipped.

    Raises:
        CellfluxError: missing or empty file, a line that is not UTF-8, a missing column (with the
            delimiter named when the header is ``;``- or tab-separated), a row with the wrong number of
            fields, or a malformed line; each names the file (and line).
    """
    path = Path(path)
    header = read_header(path, columns)
    present = (*columns, *(c for c in optional if c in header and c not in columns))
    pos = [header.index(c) for c in present]
    reader = csv.reader(text_lines(path))
    try:
        next(reader)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise CellfluxError(f"{path} line {reader.line_num}: {len(row)} fields, expected {len(header)} "
                                    f"(as in the header)")
            yield reader.line_num, {c: row[p].strip() for c, p in zip(present, pos)}
    except csv.Error as exc:
        raise CellfluxError(f"{path} line {reader.line_num}: not a readable CSV line ({exc})") from None


def all_lines(path: str | os.PathLike) -> list[str]:
    """Every line of a user's CSV, decoded (:func:`text_lines`), without line endings."""
    return [line.rstrip("\r\n") for line in text_lines(path)]
