"""`augsearch submit CONFIG`: run `augsearch search` as a Ray job on a running cluster; submitting again finishes it."""

from __future__ import annotations

import argparse

from augsearch.cli.search import add_search_options, search_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit a search as a Ray job to a running cluster (resubmitting the same search finishes it)",
        description="The search runs on the cluster, not in this terminal. Its job id comes from the config's hash "
        "and --name, its run folder is OUT/<job id>, so submitting the same search again after a stop or a failure "
        "resumes that folder: finished trials are kept, the others continue from their last checkpoints. "
        "Follow it with `augsearch jobs`.",
    )
    parser.add_argument("config", help="experiment TOML")
    parser.add_argument("--address", default=None, metavar="URL",
                        help="the head's dashboard, http://HEAD:8265 (default http://127.0.0.1:8265; "
                        "RAY_API_SERVER_ADDRESS or RAY_ADDRESS in the environment take precedence, as in Ray)")
    parser.add_argument("--name", help="names the search (default: the config's name); part of the job id")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="storage for run folders, DIR/<job id> (default runs/jobs, relative to here); on a "
                        "multi-node cluster an absolute path every node mounts")
    parser.add_argument("--driver-cpus", type=float, default=1.0,
                        help="CPUs reserved for the job's driver, the Tune loop (default 1); trials reserve their own")
    parser.add_argument("--ship-code", action="store_true",
                        help="ship this augsearch package with the job (runtime_env py_modules) instead of using the "
                        "one installed on the nodes; its dependencies must be installed there")
    add_search_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from augsearch.config import load_config
    from augsearch.service import jobs

    cfg = load_config(args.config, search_overrides(args))
    address = args.address or jobs.DEFAULT_ADDRESS
    submission = jobs.submit(cfg, address=address, name=args.name, out=args.out or jobs.DEFAULT_OUT,
                             ship_code=args.ship_code, driver_cpus=args.driver_cpus)
    what = "a new search" if submission.attempt == 1 else f"attempt {submission.attempt}, resuming the search"
    flag = f" --address {address}" if args.address else ""
    print(f"submitted job {submission.submission_id} ({what})\n"
          f"run folder: {submission.run_dir}\n"
          f"follow: augsearch jobs logs {submission.submission_id} --follow{flag}\n"
          f"status: augsearch jobs status {submission.submission_id}{flag}\n"
          f"stop:   augsearch jobs stop {submission.submission_id}{flag}")
    return 0
