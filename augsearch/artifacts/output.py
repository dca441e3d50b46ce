"""Output folders are never overwritten unasked: one that holds files is refused unless the user says --overwrite."""

from __future__ import annotations

from pathlib import Path

from augsearch.errors import AugsearchError


class OutputExistsError(AugsearchError):
    """An output folder that already holds files, or an output path that is a file."""


def check_output_dir(out: Path, *, overwrite: bool, option: str = "--out") -> None:
    """Refuse OUT when it is a file, or a folder holding files and `overwrite` is not set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{option} {out} is a file; pass a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (" ..." if len(held) > 5 else "")
        raise OutputExistsError(f"{option} {out} already holds files ({shown}); pass --overwrite to write into it "
                                f"(files of the same name are replaced), or a new {option} folder")
