"""`augsearch serve EXPORT_DIR ...`: the learned-TTA inference endpoint on a local Ray Serve, until Ctrl-C."""

from __future__ import annotations

import argparse
import sys


def _replicas(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve exported (segmenter, policy) pairs over HTTP with learned TTA (Ray Serve)",
        description="Starts a local Ray on 127.0.0.1 and a Ray Serve application with the routes POST "
        "/v1/models/{id}/predict, GET /v1/models, /healthz and /readyz; runs until Ctrl-C or SIGTERM, then stops "
        "Serve and Ray. A model's id is its export folder's name, or ID in ID=EXPORT_DIR.",
    )
    parser.add_argument("exports", nargs="+", metavar="EXPORT_DIR",
                        help="folder written by `augsearch export` (checkpoint.pt + policy.json), or ID=EXPORT_DIR")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=_replicas, default=1,
                        help="Segmenter replicas: a number, or auto (Serve's autoscaling); default 1")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per replica; also its torch threads")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0,
                        help="GPUs per replica, fractions share a GPU (e.g. 0.5); default 0 (CPU)")
    parser.add_argument("--models-per-replica", type=int, default=None,
                        help="models a replica keeps loaded (LRU); default all")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sliding windows per model call, all TTA views together, as `augsearch predict "
                        "--batch-size` (default 8); a GPU replica gains from more")
    parser.add_argument("--max-upload-mb", type=float, default=None, help="largest upload in MiB (default 256)")
    parser.add_argument("--max-voxels", type=int, default=None,
                        help="largest volume in voxels, channels included (default 2^25 = 512x512x128)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from augsearch.service.serve import Limits, ServiceOptions, load_model_infos, run_until_stopped

    limits = Limits.from_options(args.max_upload_mb, args.max_voxels)
    options = ServiceOptions(host=args.host, port=args.port, replicas=args.replicas,
                             cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                             models_per_replica=args.models_per_replica, batch_size=args.batch_size,
                             limits=limits)
    models = load_model_infos(args.exports)
    for info in models:
        print(f"model {info.id}: {info.dims}D, labels {info.labels}, {info.policy_summary}")

    def announce(url: str) -> None:
        print(f"serving {len(models)} model(s) on {url} (POST {url}/v1/models/<id>/predict); Ctrl-C stops",
              flush=True)

    run_until_stopped(models, options, announce)
    print("stopped", file=sys.stderr)
    return 0
