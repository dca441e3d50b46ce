"""Search jobs on a running Ray cluster through Ray's job submission SDK: submit, drive, list, status, logs, stop.

`submit` validates the config (overrides applied, relative paths made absolute), ships it in the job's runtime
environment (a `working_dir` holding `config.json`) and runs `python -m augsearch jobs drive config.json --out
RUN_DIR` as the job's entrypoint, with `driver_cpus` CPUs reserved for that driver; trials reserve their own.

The submission id is derived from the config's sha256 and the name, and the run folder from the id, so submitting the
same search again finds the same folder: `drive` resumes the search there (Tune restore: finished trials stay as they
are, the others continue from their last checkpoints). Ray refuses a submission id it already holds, so a
resubmission after a stopped or failed job gets the suffix -r2, -r3, ...; while a job of the search is still pending
or running, or after it succeeded, nothing is submitted.

The project is either installed on every node (the default) or shipped with the job (`ship_code`: the local
`augsearch` package as runtime_env `py_modules`; its dependencies must still be installed on the nodes).

Token authentication: when a token exists (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token,
Ray's own order) it goes with every request as `Authorization: Bearer <token>`.

This is the only module that imports ray.job_submission.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import augsearch
from augsearch.artifacts.layout import MANIFEST_NAME
from augsearch.config import ExperimentConfig, config_from_dict
from augsearch.errors import AugsearchError
from augsearch.service.progress import SearchProgress, config_value, search_progress
from augsearch.tune.search import new_search, read_manifest, resume_search
from augsearch.tune.space import PATH_KEYS, absolute_paths
from augsearch.tune.summary import SearchResult

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_OUT = "runs/jobs"
CONFIG_FILE = "config.json"  # the shipped config, at the root of the job's working_dir
TUNER_STATE = "tuner.pkl"  # Ray Tune's state in a search folder: present once the search has started
JOB_KIND = "augsearch-search"  # metadata["kind"] of the jobs this module submits
ACTIVE = ("PENDING", "RUNNING")
STOP_WAIT_S = 60.0
AGENT_WAIT_S = 60.0  # how long a submission waits for a starting head's job agent


class JobError(AugsearchError):
    """A job that cannot be submitted, found or driven: unreachable cluster, missing token, wrong storage, bad id."""


@dataclass
class Submission:
    submission_id: str
    run_dir: Path  # the search folder on the cluster's storage
    attempt: int  # 1 for a new search; n > 1 when the job finishes the search earlier jobs left in run_dir


@dataclass
class JobReport:
    submission_id: str
    status: str  # Ray's JobStatus name: PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str
    metadata: dict[str, str]
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    progress: SearchProgress | None  # None when the run folder is not visible from this machine
    note: str | None  # why there is no progress


# ----------------------------------------------------------------------------------------------- client


def status_name(status: Any) -> str:
    """Ray's JobStatus (an enum) as its name, e.g. 'RUNNING'."""
    return getattr(status, "value", str(status))


def auth_token() -> str | None:
    """The cluster's token, in Ray's own order: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    return None


def _headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextmanager
def _sdk_errors(address: str) -> Iterator[None]:
    """Turn the SDK's connection and authentication failures into JobErrors that say what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except ConnectionError as err:
        raise JobError(f"cannot reach Ray's job server at {address} ({err}); start the head with "
                       f"workers/start_head.sh and pass its dashboard address, e.g. --address http://HEAD:8265"
                       ) from None
    except AuthenticationError as err:
        sent = "the token found here was refused" if auth_token() else "no token was found here"
        raise JobError(f"the cluster at {address} uses token authentication and {sent} "
                       f"({str(err).splitlines()[0]}); put the head's token (`ray get-auth-token` on the head prints "
                       f"it) in RAY_AUTH_TOKEN or ~/.ray/auth_token on this machine") from None
    except RuntimeError as err:
        text = str(err)
        if "does not exist" in text or "404" in text:
            raise JobError(f"{text.splitlines()[0]}; `augsearch jobs list --address {address}` lists the jobs"
                           ) from None
        raise


def connect(address: str = DEFAULT_ADDRESS) -> Any:
    """A JobSubmissionClient for the dashboard at ADDRESS (http://HEAD:8265), sending the token when one exists."""
    from ray.job_submission import JobSubmissionClient

    with _sdk_errors(address):
        return JobSubmissionClient(address, headers=_headers())


def alive_nodes(address: str) -> int:
    """How many nodes of the cluster are alive (Ray's state API, through the same dashboard)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    with _sdk_errors(address):
        client = StateApiClient(address, headers={"Content-Type": "application/json", **_headers()})
        nodes = client.list(StateResource.NODES, options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
                            raise_on_missing_output=False)
    return len(nodes)


# ----------------------------------------------------------------------------------------------- submit


def job_base_id(name: str, config_sha256: str) -> str:
    """The submission id of a search's first job: the name (letters, digits, dashes) and the config hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "search"
    return f"augsearch-{slug}-{config_sha256[:12]}"


def _attempt(base: str, submission_id: str | None) -> int | None:
    """1 for BASE itself, n for BASE-rn, None for any other id."""
    match = re.fullmatch(re.escape(base) + r"(?:-r(\d+))?", submission_id or "")
    if match is None:
        return None
    return int(match.group(1) or 1)


def _cluster_config(cfg: ExperimentConfig) -> tuple[ExperimentConfig, list[str]]:
    """The config with relative paths made absolute against this directory, and the keys that were relative."""
    tree = cfg.to_dict()
    fixed, space = absolute_paths(tree, cfg.search.space)
    fixed["search"]["space"] = space
    relative = [key for key in PATH_KEYS if config_value(fixed, key) != config_value(tree, key)]
    relative += [f"search.space[{key!r}]" for key in PATH_KEYS if space.get(key) != cfg.search.space.get(key)]
    return config_from_dict(fixed, source="submitted config"), relative


def _check_storage(out: str, relative_keys: list[str], nodes: int) -> None:
    """The run folder and data must be the same files on every node: refuse what only one node would see."""
    if "://" in out:
        raise JobError(f"--out {out} is a storage URI; the search folder is written as files by the driver and by "
                       f"every trial, so it must be a filesystem path: mount the storage (NFS, a bucket through a "
                       f"FUSE mount) at the same path on every node and pass that path")
    if nodes <= 1:
        return
    local = ([f"--out {out}"] if not Path(out).is_absolute() else []) + relative_keys
    if local:
        raise JobError(f"the cluster has {nodes} alive nodes and {', '.join(local)} is a relative, node-local path; "
                       f"trials on other nodes would write and read different folders. Pass absolute paths on "
                       f"storage every node mounts at the same place (a shared path such as /mnt/shared/runs, or a "
                       f"storage URI mounted there), e.g. --out /mnt/shared/runs --set data.root=/mnt/shared/data")


def submit(cfg: ExperimentConfig, *, address: str = DEFAULT_ADDRESS, name: str | None = None,
           out: str = DEFAULT_OUT, ship_code: bool = False, driver_cpus: float = 1.0) -> Submission:
    """Submit the search of CFG as a Ray job, or the job that finishes it when earlier jobs of it were stopped."""
    client = connect(address)
    cfg, relative_keys = _cluster_config(cfg)
    _check_storage(out, relative_keys, alive_nodes(address))
    base = job_base_id(name or cfg.name, cfg.fingerprint())
    run_dir = Path(os.path.abspath(out)) / base
    with _sdk_errors(address):
        earlier = sorted(((_attempt(base, job.submission_id), job) for job in client.list_jobs()
                          if _attempt(base, job.submission_id) is not None), key=lambda pair: pair[0])
    for _, job in earlier:
        status = status_name(job.status)
        if status in ACTIVE:
            raise JobError(f"this search is already {status.lower()} as job {job.submission_id} (run folder "
                           f"{run_dir}); follow it with `augsearch jobs logs {job.submission_id} --follow`, or stop "
                           f"it with `augsearch jobs stop {job.submission_id}` and submit again to finish it later")
    if earlier and status_name(earlier[-1][1].status) == "SUCCEEDED":
        done = earlier[-1][1].submission_id
        raise JobError(f"this search already finished as job {done}; see `augsearch jobs status {done}` and export "
                       f"it with `augsearch export {run_dir} --out DIR`. To run it again from the start, submit it "
                       f"under another --name")
    attempt = earlier[-1][0] + 1 if earlier else 1
    submission_id = base if attempt == 1 else f"{base}-r{attempt}"
    metadata = {"kind": JOB_KIND, "name": name or cfg.name, "config_sha256": cfg.fingerprint(),
                "run_dir": str(run_dir), "attempt": str(attempt)}
    with tempfile.TemporaryDirectory(prefix="augsearch-job-") as working_dir:
        (Path(working_dir) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        runtime_env: dict[str, Any] = {"working_dir": working_dir}
        if ship_code:
            runtime_env["py_modules"] = [str(Path(augsearch.__file__).parent)]
        entrypoint = f"python -m augsearch jobs drive {CONFIG_FILE} --out {shlex.quote(str(run_dir))}"
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                with _sdk_errors(address):
                    client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                                      metadata=metadata, entrypoint_num_cpus=driver_cpus)
                break
            except RuntimeError as err:
                # a head that has just started answers before its node's job agent is up; Ray says to retry
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
    return Submission(submission_id=submission_id, run_dir=run_dir, attempt=attempt)


# ----------------------------------------------------------------------------------------------- drive


def drive(config_file: Path, run_dir: Path) -> SearchResult:
    """The job's entrypoint, on the cluster: start the search in RUN_DIR, or resume the one an earlier job began."""
    config_file, run_dir = Path(config_file), Path(run_dir)
    cfg = config_from_dict(json.loads(config_file.read_text()), source=str(config_file))
    if (run_dir / TUNER_STATE).is_file():
        manifest = read_manifest(run_dir)
        if manifest.get("config_hash") != cfg.fingerprint():
            raise JobError(f"{run_dir} holds another search (config sha256 {manifest.get('config_hash')}, this job's "
                           f"is {cfg.fingerprint()}); submit with another --out or --name")
        print(f"resuming the search in {run_dir}: finished trials stay as they are, the others continue from their "
              f"last checkpoints", flush=True)
        return resume_search(run_dir, address="auto")
    if run_dir.is_dir():
        entries = sorted(path.name for path in run_dir.iterdir())
        if entries == [MANIFEST_NAME] and read_manifest(run_dir).get("config_hash") == cfg.fingerprint():
            # an earlier job of this search stopped before Tune started: nothing was trained, start it afresh
            (run_dir / MANIFEST_NAME).unlink()
        elif entries:
            raise JobError(f"{run_dir} holds files but no started search ({', '.join(entries[:5])}); pass another "
                           f"--out or remove that folder")
    return new_search(cfg, run_dir, address="auto")


# ----------------------------------------------------------------------------------------------- follow


def list_jobs(address: str = DEFAULT_ADDRESS, *, every_job: bool = False) -> list[Any]:
    """The cluster's search jobs (every submitted job with every_job), oldest first, as Ray's JobDetails."""
    client = connect(address)
    with _sdk_errors(address):
        jobs = [job for job in client.list_jobs() if job.submission_id]
    if not every_job:
        jobs = [job for job in jobs if (job.metadata or {}).get("kind") == JOB_KIND]
    return sorted(jobs, key=lambda job: job.start_time or 0)


def status(submission_id: str, address: str = DEFAULT_ADDRESS) -> JobReport:
    """The job's state and, when its run folder is visible here, its trial table so far."""
    client = connect(address)
    with _sdk_errors(address):
        info = client.get_job_info(submission_id)
    state = status_name(info.status)
    metadata = dict(info.metadata or {})
    progress, note = None, None
    run_dir = metadata.get("run_dir")
    if metadata.get("kind") != JOB_KIND or not run_dir:
        note = "not a search job of augsearch submit (its metadata names no run folder)"
    elif not (Path(run_dir) / MANIFEST_NAME).is_file():
        note = (f"the run folder {run_dir} is not visible from this machine (or the search has not written it "
                f"yet); run this on a node that mounts the cluster's storage")
    else:
        progress = search_progress(Path(run_dir), running=state in ACTIVE)
    return JobReport(submission_id=submission_id, status=state, message=info.message or "", metadata=metadata,
                     start_time=info.start_time / 1000 if info.start_time else None,
                     end_time=info.end_time / 1000 if info.end_time else None, progress=progress, note=note)


def logs(submission_id: str, address: str = DEFAULT_ADDRESS) -> str:
    """The job's driver output so far."""
    client = connect(address)
    with _sdk_errors(address):
        return client.get_job_logs(submission_id)


def follow(submission_id: str, write: Callable[[str], None], address: str = DEFAULT_ADDRESS) -> str:
    """Pass the job's driver output to WRITE as it comes, until the job ends; returns its final status."""
    client = connect(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    with _sdk_errors(address):
        client.get_job_status(submission_id)  # an unknown id fails here with a clear message
        asyncio.run(tail())
        return status_name(client.get_job_status(submission_id))


def stop(submission_id: str, address: str = DEFAULT_ADDRESS, wait_s: float = STOP_WAIT_S) -> tuple[bool, str]:
    """Ask the job to stop and wait until Ray says it has ended (at most WAIT_S): whether a stop was asked (False
    when the job had ended already) and the status then."""
    client = connect(address)
    with _sdk_errors(address):
        asked = client.stop_job(submission_id)
        deadline = time.monotonic() + wait_s
        while True:
            state = status_name(client.get_job_status(submission_id))
            if state not in ACTIVE or time.monotonic() > deadline:
                return asked, state
            time.sleep(0.5)
