"""JSONL files read line by line: every reader of the project's JSON-lines
inputs (chat, text, JourneyDB annotations, commonsense task files) goes
through here, so a bad line is reported the same way everywhere: the file,
the line number, what is wrong with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from etils import epath

from monoformer_jax.errors import FileFormatError


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number from 1, text without its line end) of a UTF-8 file, local or
  on a bucket (`gs://...`)."""
  with epath.Path(path).open("rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise FileFormatError(
          f"{path}, line {number}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
        ) from e
      yield number, line.rstrip("\n").rstrip("\r")


def json_objects(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, object) of each non-blank line of a JSONL file."""
  for number, line in numbered_lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise FileFormatError(
        f"{path}, line {number}: not JSON ({e.msg} at column "
        f"{e.colno}); each line must be one JSON object"
      ) from e
    if not isinstance(record, dict):
      raise FileFormatError(
        f"{path}, line {number}: a JSON {type(record).__name__}, not an "
        "object; each line must be one JSON object"
      )
    yield number, record
