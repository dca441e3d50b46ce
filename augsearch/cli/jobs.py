"""`augsearch jobs list|status|logs|stop|drive`: search jobs on a running Ray cluster."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("jobs", help="list, follow and stop the search jobs of a running Ray cluster")
    sub = parser.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    def action(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--address", default=None, metavar="URL",
                       help="the head's dashboard, http://HEAD:8265 (default http://127.0.0.1:8265)")
        p.set_defaults(func=func)
        return p

    listing = action("list", "the search jobs, oldest first", _list)
    listing.add_argument("--all", dest="every_job", action="store_true", help="every job of the cluster")
    status = action("status", "the job's state, its trial table so far and the best validation metric", _status)
    status.add_argument("submission_id", metavar="ID")
    logs = action("logs", "the job's output (the search's driver and its trials)", _logs)
    logs.add_argument("submission_id", metavar="ID")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends; exit 0 if it succeeded")
    stop = action("stop", "stop the job; submitting the same search again finishes it", _stop)
    stop.add_argument("submission_id", metavar="ID")

    drive = sub.add_parser("drive", help="the job's entrypoint on the cluster: start the search or resume it")
    drive.add_argument("config", metavar="CONFIG_JSON", help="the validated config `augsearch submit` ships")
    drive.add_argument("--out", required=True, metavar="RUN_DIR", help="the search folder")
    drive.set_defaults(func=_drive)


def _address(args: argparse.Namespace) -> str:
    from augsearch.service.jobs import DEFAULT_ADDRESS

    return args.address or DEFAULT_ADDRESS


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _list(args: argparse.Namespace) -> int:
    from augsearch.service import jobs

    found = jobs.list_jobs(_address(args), every_job=args.every_job)
    if not found:
        print("no search jobs on this cluster" if not args.every_job else "no jobs on this cluster")
        return 0
    rows = [("job", "status", "started", "name", "run folder")]
    for job in found:
        meta = job.metadata or {}
        rows.append((job.submission_id, jobs.status_name(job.status), _when((job.start_time or 0) / 1000),
                     meta.get("name", "-"), meta.get("run_dir", job.entrypoint)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _status(args: argparse.Namespace) -> int:
    from augsearch.service import jobs
    from augsearch.tune.summary import format_table

    report = jobs.status(args.submission_id, _address(args))
    meta = report.metadata
    print(f"job {report.submission_id}: {report.status} (started {_when(report.start_time)}, "
          f"ended {_when(report.end_time)}){': ' + report.message if report.message else ''}")
    if meta.get("run_dir"):
        print(f"search {meta.get('name', '-')}, attempt {meta.get('attempt', '1')}, run folder {meta['run_dir']}")
    if report.progress is None:
        print(report.note)
        return 0
    progress = report.progress
    source = ("the search's summary" if progress.finished else
              f"each started trial's metrics; {len(progress.rows)} trial(s) started so far")
    print(f"trials (from {source}; a trial finishes at epoch {progress.epochs}):")
    if progress.rows:
        print(format_table(progress.rows, progress.metric))
    best = progress.best
    if best is None:
        print(f"best {progress.metric}: none reported yet")
    else:
        print(f"best {progress.metric} ({progress.mode}) so far: {best['metrics'][progress.metric]:.4f}, trial "
              f"{best['trial']} at epoch {best['metrics'].get('epoch', '-')}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    from augsearch.service import jobs

    if not args.follow:
        sys.stdout.write(jobs.logs(args.submission_id, _address(args)))
        return 0

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    final = jobs.follow(args.submission_id, write, _address(args))
    print(f"job {args.submission_id} ended: {final}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else 1


def _stop(args: argparse.Namespace) -> int:
    from augsearch.service import jobs

    asked, final = jobs.stop(args.submission_id, _address(args))
    if not asked:
        print(f"job {args.submission_id} had already ended: {final}")
        return 0
    if final in jobs.ACTIVE:
        print(f"job {args.submission_id} is still {final} after {jobs.STOP_WAIT_S:.0f} s; check again with "
              f"augsearch jobs status {args.submission_id}", file=sys.stderr)
        return 1
    print(f"job {args.submission_id}: {final}; submit the same search again (same CONFIG, --set and --name) to "
          f"finish it without repeating finished trials")
    return 0


def _drive(args: argparse.Namespace) -> int:
    from pathlib import Path

    from augsearch.service.jobs import drive

    result = drive(Path(args.config), Path(args.out))
    if result.failed:
        names = ", ".join(row["trial"] for row in result.failed)
        print(f"augsearch jobs drive: {len(result.failed)} trial(s) failed ({names}); submit the same search again "
              f"to retry them", file=sys.stderr)
        return 1
    return 0
