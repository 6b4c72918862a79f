"""Read raw rows from a local file, a hub dataset, or the embedded dataset.

Accepted sources (`--data`):
  * nothing: the embedded dataset, `data/medical_flashcards.jsonl` (written for this project);
  * a local `.json` (one list, or JSON lines), `.jsonl`, `.csv` or `.parquet` file;
  * a hub dataset id such as `medalpaca/medical_meadow_medical_flashcards`.

Every failure the user can fix raises `DataError` with one line naming the file (and line).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED_DATASET = Path(__file__).with_name("medical_flashcards.jsonl")
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DataError(ValueError):
    """Input data that cannot be used; the message is one line saying what and where."""


@dataclass
class RawRows:
    """Rows as read, before any cleaning, and how many unreadable rows were skipped."""

    source: str
    rows: list[dict]
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)


def load_rows(source: str | None = None, skip_bad_rows: bool = False) -> RawRows:
    """Read every row of `source` as a dict (see the module docstring for what `source` may be)."""
    if source in (None, "", "embedded"):
        return _read_json_lines(EMBEDDED_DATASET, skip_bad_rows=False)
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{source}: file not found")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_json_lines(path, skip_bad_rows)
        if suffix == ".json":
            return _read_json(path, skip_bad_rows)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        raise DataError(f"{source}: unsupported file type '{suffix}', expected one of {', '.join(LOCAL_SUFFIXES)}")
    return _read_hub(source)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); re-save it as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _read_json(path: Path, skip_bad_rows: bool) -> RawRows:
    """A `.json` file holds either one JSON list of objects or JSON lines."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
        return _check_objects(path, rows)
    return _parse_json_lines(path, text, skip_bad_rows)


def _read_json_lines(path: Path, skip_bad_rows: bool) -> RawRows:
    return _parse_json_lines(path, _read_text(path), skip_bad_rows)


def _parse_json_lines(path: Path, text: str, skip_bad_rows: bool) -> RawRows:
    result = RawRows(str(path), [])
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            if not skip_bad_rows:
                raise DataError(
                    f"{path}: line {number}: invalid JSON row ({reason}); fix it "
                    f"(python -m data --data {path} --skip-bad-rows counts the bad lines)"
                ) from None
            result.bad_rows += 1
            if len(result.bad_row_examples) < 3:
                result.bad_row_examples.append(f"line {number}: {reason}")
            continue
        result.rows.append(row)
    return result


def _check_objects(path: Path, rows: object) -> RawRows:
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {index}: expected a JSON object, got {type(row).__name__}")
    return RawRows(str(path), rows)


def _read_csv(path: Path) -> RawRows:
    text = _read_text(path)
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise DataError(f"{path}: unreadable CSV ({error})") from None
    return RawRows(str(path), [{k: v for k, v in row.items() if k is not None} for row in rows])


def _read_parquet(path: Path) -> RawRows:
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path))
    except Exception as error:  # pyarrow raises many types for a bad file
        raise DataError(f"{path}: unreadable parquet file ({type(error).__name__})") from None
    return RawRows(str(path), table.to_list())


def _read_hub(dataset_id: str) -> RawRows:
    if dataset_id.count("/") != 1:
        raise DataError(
            f"--data {dataset_id}: no such file, and not a hub dataset id of the form 'owner/name'"
        )
    from datasets import load_dataset

    try:
        table = load_dataset(dataset_id, split="train")
    except Exception as error:  # network, auth and missing-dataset errors have many types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise DataError(
            f"could not load dataset '{dataset_id}' from the hub ({first}); "
            "without a network, download it elsewhere and pass the local file with --data PATH"
        ) from None
    return RawRows(dataset_id, table.to_list())
