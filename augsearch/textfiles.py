"""Reading the text files a user hands over (JSON, TOML): every way they can be malformed is one `MalformedText`.

Undecodable bytes and nesting deeper than the parsers' recursion limit would otherwise surface as
UnicodeDecodeError and RecursionError tracebacks; callers catch `MalformedText` and raise their domain error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib


class MalformedText(ValueError):
    """The reason a file's text cannot be parsed: where and what, without the file name (callers add it)."""


MAX_BYTES = 64 * 2**20  # configs, policy files and dataset.json are kilobytes; this refuses a device or a blob


def read_text(path: str | Path) -> str:
    """The file's text as strict UTF-8 (FileNotFoundError and IsADirectoryError pass through for callers)."""
    path = Path(path)
    if path.exists() and not path.is_dir() and not path.is_file():
        raise MalformedText("not a regular file (a device, pipe or socket); give a text file")
    with open(path, "rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise MalformedText(f"larger than {MAX_BYTES // 2**20} MiB, far more than a text file of this kind holds")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise MalformedText(f"not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}); save it as UTF-8") \
            from None


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedText(f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise MalformedText("JSON nested too deeply to parse") from None


def parse_toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise MalformedText(f"not valid TOML ({err})") from None
    except RecursionError:
        raise MalformedText("TOML nested too deeply to parse") from None


def read_json(path: str | Path) -> Any:
    return parse_json(read_text(path))
