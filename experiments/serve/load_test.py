"""Bounded load test of the learned-TTA endpoint on 127.0.0.1, beside `augsearch predict` on the same volume.

1. A real export: `augsearch train experiments/serve/model3d.toml` (the bundled 3D benchmark, generated on first
   use) and `augsearch export`; the volume is the first test case (imagesTs).
2. `augsearch predict` on that volume: the command's wall time (process start included) and the per-case time of
   the same function in a warm process, both on one CPU thread like one Serve replica.
3. Whether batching windows across requests could help: the segmenter's time per sliding window at growing batch
   sizes (one prediction already batches its windows, all TTA views together, by 8).
4. `augsearch serve EXPORT` (one replica, one CPU), single requests, then CLIENTS concurrent clients x REQUESTS
   requests each, bounded by a per-request timeout and a deadline; the RSS of the Serve processes before and after.
5. SIGTERM, then a check that no process of the service is left.

Writes experiments/serve/results.json and experiments/serve/README.md (table with machine, date and commit).
Usage: python experiments/serve/load_test.py [--work runs/serve-load] [--clients 4] [--requests 25]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil  # installed with the test extra (pip install -e '.[test]')

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFIG = HERE / "model3d.toml"
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def augsearch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "augsearch", *args], env=ENV, check=True, **kwargs)


def make_export(work: Path) -> tuple[Path, Path]:
    """(export folder, test volume): trained and exported once, reused by later runs."""
    export = work / "export"
    if not (export / "policy.json").is_file():
        augsearch("train", str(CONFIG), "--out", str(work / "run"), "--set", f'data.root="{work / "data"}"')
        augsearch("export", str(work / "run"), "--out", str(export))
    volume = min((work / "data" / "imagesTs").glob("*.nii.gz"))
    return export, volume


def command_times(export: Path, volume: Path, out: Path, device: str, repeats: int = 3) -> dict:
    """Wall time of the `augsearch predict` command on the volume (process start and imports included)."""
    wall = []
    for i in range(repeats):
        start = time.perf_counter()
        augsearch("predict", "--model", str(export / "checkpoint.pt"), "--policy", str(export / "policy.json"),
                  "--input", str(volume), "--output", str(out / f"cli_{i}"), "--device", device,
                  stdout=subprocess.DEVNULL)
        wall.append(time.perf_counter() - start)
    return {"command_wall_s": wall, "command_wall_median_s": statistics.median(wall)}


def warm_predict(export: Path, volume: Path, out: Path, device: str):
    """A callable timing `predict_files` (what `augsearch predict` runs) on the volume in this process, 1 thread."""
    import torch

    from augsearch.predict.files import predict_files

    torch.set_num_threads(1)
    runs = iter(range(10**6))

    def once() -> float:
        start = time.perf_counter()
        predict_files(export / "checkpoint.pt", volume, out / f"warm_{next(runs)}", policy=export / "policy.json",
                      device=device, progress=False)
        return time.perf_counter() - start

    once()  # imports and first-call setup are the command's cost, not the per-case time
    return once


def window_batching(export: Path, batches=(1, 4, 8, 16, 32), repeats: int = 3, device: str = "cpu") -> dict:
    """ms per sliding window of the export's segmenter by batch size (CPU: one thread)."""
    import torch

    from augsearch.artifacts.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    ckpt = load_checkpoint(export / "checkpoint.pt")
    model = ckpt.build_model().to(device)
    patch = ckpt.patch_size
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = {}
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, ckpt.in_channels, *patch, device=device)
            model(x)
            times = []
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - start)
            rows[str(batch)] = 1000 * statistics.median(times) / batch
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu, 1 thread"
    return {"device": name, "patch_size": patch, "ms_per_window": rows}


def request_anatomy(export: Path, volume: Path, device: str, repeats: int = 3) -> dict:
    """One case's `predict_case` in three parts (medians of `repeats`, ms): the segmenter's forward calls (and how
    many windows went through them), the rest of `predict_tta` (TTA transforms, window weighting), and the part
    outside `predict_tta` (read, preprocess, resample back), which runs on the CPU whatever the device."""
    import torch

    from augsearch.artifacts.checkpoint import load_checkpoint
    from augsearch.policy.presets import policy_from_file_or_preset
    from augsearch.predict import files

    torch.set_num_threads(1)
    ckpt = load_checkpoint(export / "checkpoint.pt")
    model = ckpt.build_model().to(device)
    policy = policy_from_file_or_preset(export / "policy.json", ckpt.dims, ckpt.label_names)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    state = {"windows": 0, "model_s": 0.0, "tta_s": 0.0, "start": 0.0}

    def before(module, inputs):
        sync()
        state["start"] = time.perf_counter()

    def after(module, inputs, output):
        sync()
        state["model_s"] += time.perf_counter() - state["start"]
        state["windows"] += inputs[0].shape[0]

    def timed_tta(*args, **kwargs):
        start = time.perf_counter()
        result = real_tta(*args, **kwargs)
        sync()
        state["tta_s"] += time.perf_counter() - start
        return result

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    real_tta, files.predict_tta = files.predict_tta, timed_tta
    rows = []
    try:
        for _ in range(repeats + 1):
            state.update(windows=0, model_s=0.0, tta_s=0.0)
            start = time.perf_counter()
            files.predict_case(model, ckpt, files.InputCase("case", (volume,)), policy, device=torch.device(device))
            total = time.perf_counter() - start
            rows.append((state["windows"], state["model_s"], state["tta_s"] - state["model_s"],
                         total - state["tta_s"]))
    finally:
        files.predict_tta = real_tta
    rows = rows[1:]
    return {"windows": rows[0][0], **{key: 1000 * statistics.median(r[i] for r in rows) for i, key in
                                      ((1, "model_ms"), (2, "tta_other_ms"), (3, "outside_tta_ms"))}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree(root: int) -> dict[int, str]:
    """Processes below `root` (pid -> command line)."""
    found = {}
    for child in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may end while we look
            found[child.pid] = " ".join(child.cmdline())
    return found


def rss_mb(pid: int) -> float | None:
    """Resident memory (MiB) of `pid`; None once it has ended."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def serve_memory(root: int) -> dict[str, float]:
    """RSS (MiB) of the Serve processes below the `augsearch serve` process: replicas, proxy, controller."""
    found = {}
    for pid, cmd in process_tree(root).items():
        name = cmd.split()[0] if cmd else ""
        if name.startswith(("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController")):
            value = rss_mb(pid)
            if value is not None:
                found[f"{name} ({pid})"] = round(value, 1)
    return found


def post(url: str, body: bytes, timeout: float) -> tuple[int, float, bytes | str]:
    start = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, time.perf_counter() - start, response.read()
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - start, err.read().decode(errors="replace")[:300]
    except OSError as err:
        return 0, time.perf_counter() - start, f"{type(err).__name__}: {err}"


def load(url: str, body: bytes, clients: int, requests: int, timeout: float, deadline_s: float,
         server_pid: int) -> dict:
    """CLIENTS threads x REQUESTS posts each; no new request after the deadline. The Segmenter replicas' RSS is
    sampled after every `clients` completed requests."""
    results: list[tuple[int, float, str]] = []
    rss_trace: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        for _ in range(requests):
            if time.monotonic() > stop_at:
                return
            status, seconds, answer = post(url, body, timeout)
            with lock:
                results.append((status, seconds, "" if status == 200 else str(answer)))
                sample = len(results) % clients == 0
            if sample:
                replicas = {k: v for k, v in serve_memory(server_pid).items() if "Segmenter" in k}
                rss_trace.append({"requests_done": len(results), "segmenter_rss_mb": sum(replicas.values())})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = sorted(s for status, s, _ in results if status == 200)
    failures = [{"status": status, "answer": answer} for status, _, answer in results if status != 200]
    return {
        "clients": clients, "requests_per_client": requests, "sent": len(results), "succeeded": len(ok),
        "failed": len(failures), "not_sent_by_deadline": clients * requests - len(results),
        "failures": failures[:10], "wall_s": wall, "throughput_rps": len(ok) / wall,
        "latency_p50_s": float(np.percentile(ok, 50)) if ok else None,
        "latency_p95_s": float(np.percentile(ok, 95)) if ok else None,
        "latency_max_s": ok[-1] if ok else None,
        "segmenter_rss_trace": sorted(rss_trace, key=lambda row: row["requests_done"]),
    }


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_service(export: Path, volume: Path, work: Path, args: argparse.Namespace, cli_once) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "augsearch", "serve", str(export), "--port", str(port),
                             "--gpus-per-replica", str(args.gpus_per_replica)],
                            env=ENV, stdout=log, stderr=subprocess.STDOUT)
    started = time.perf_counter()
    seen: dict[int, str] = {}
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"augsearch serve exited with {proc.returncode}; see {work / 'serve.log'}")
            if time.perf_counter() - started > 300:
                raise SystemExit("augsearch serve was not ready within 300 s")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        ready_s = time.perf_counter() - started
        seen.update(process_tree(proc.pid))
        predict_url = f"{url}/v1/models/export/predict"
        body = volume.read_bytes()
        memory_ready = serve_memory(proc.pid)
        # Served request and CLI per-case time in turns: the machine's other load hits both alike.
        sequential, cli_warm = [], []
        for _ in range(args.pairs):
            sequential.append(post(predict_url, body, args.timeout))
            cli_warm.append(cli_once())
        if any(status != 200 for status, _, _ in sequential):
            raise SystemExit(f"sequential requests failed: {[(s, a) for s, _, a in sequential if s != 200]}")
        (work / "served.nii.gz").write_bytes(sequential[0][2])
        memory_before = serve_memory(proc.pid)
        load_avg_before = os.getloadavg()
        result = load(predict_url, body, args.clients, args.requests, args.timeout, args.deadline, proc.pid)
        result["machine_load_avg_1m"] = [load_avg_before[0], os.getloadavg()[0]]
        memory_after = serve_memory(proc.pid)
        seen.update(process_tree(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(alive(pid) for pid in seen):
        time.sleep(0.5)
    return {
        "ready_after_s": ready_s,
        "paired": {"served_s": [s for _, s, _ in sequential], "cli_per_case_s": cli_warm,
                   "served_median_s": statistics.median(s for _, s, _ in sequential),
                   "cli_per_case_median_s": statistics.median(cli_warm)},
        "load": result,
        "rss_mb": {"ready": memory_ready, "before_load": memory_before, "after_load": memory_after},
        "shutdown": {"exit_code": code, "processes_seen": len(seen),
                     "left_running": sorted(cmd[:60] for pid, cmd in seen.items() if alive(pid))},
    }


def same_segmentation(served: Path, cli: Path) -> bool:
    import nibabel as nib

    a, b = nib.load(str(served)), nib.load(str(cli))
    return bool(np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.array_equal(a.affine, b.affine))


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import ray
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") *
            os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "platform": platform.platform()}


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    return head.strip() + ("+changes" if dirty else "")


def gpu_probe_lines(results: dict) -> list[str]:
    """A paragraph on gpu_window_batching.json (the same per-window timing on a GPU), when this folder has it."""
    probe_path = HERE / "gpu_window_batching.json"
    if results["gpus_per_replica"] or not probe_path.is_file():
        return []
    probe = json.loads(probe_path.read_text())
    ms = probe["ms_per_window"]
    windows = results["request_anatomy"]["windows"]
    return [
        f"On a GPU ({probe['device']}, `gpu_window_batching.json`, {probe['date']}) the same model takes "
        + ", ".join(f"{b}: {v:.3f}" for b, v in ms.items())
        + f" ms per window by batch size: batches of 32 are {ms['8'] / ms['32']:.1f}x faster per window than "
        f"batches of 8, but one request of this volume has {windows} windows, so at batch 8 its model time is "
        f"{windows * ms['8']:.0f} ms and batching across requests could save at most "
        f"{windows * (ms['8'] - ms['32']):.0f} ms of it, against "
        f"{results['request_anatomy']['outside_tta_ms']:.0f} ms per request "
        "of reading, preprocessing and resampling back, which run on the CPU whatever the device (measured here). "
        "The endpoint's `--batch-size` takes the per-window "
        "gain without a queue across requests. The full load test did not run on that machine (it lacked Ray).",
        "",
    ]


def write_readme(results: dict, path: Path) -> None:
    load_ = results["service"]["load"]
    cli = results["cli"]
    rss = results["service"]["rss_mb"]
    replicas = {k: v for k, v in rss["after_load"].items() if "Segmenter" in k}
    before = {k: v for k, v in rss["before_load"].items() if "Segmenter" in k}
    windows = results["window_batching"]["ms_per_window"]
    gpu = f" and {results['gpus_per_replica']:g} GPU" if results["gpus_per_replica"] else ""
    on_gpu = f", on {results['window_batching']['device']}" if results["gpus_per_replica"] else ""
    paired = results["service"]["paired"]
    trace = load_["segmenter_rss_trace"]
    quarters = [trace[max(0, round(q * len(trace)) - 1)] for q in (0.25, 0.5, 0.75, 1.0)] if trace else []
    lines = [
        "# Learned-TTA endpoint: bounded load test",
        "",
        f"`python experiments/serve/load_test.py` on {results['date']}, commit {results['commit']}, "
        f"{results['machine']['cpu']} ({results['machine']['cores']} cores), torch {results['machine']['torch']}, "
        f"Ray {results['machine']['ray']}. Model: `experiments/serve/model3d.toml` (3D U-Net, {results['views']} "
        f"learned TTA views), volume {results['volume']['name']} {results['volume']['shape']}. One Segmenter "
        f"replica with one CPU{gpu}; `augsearch predict` on one thread too{on_gpu}. "
        "The served and CLI per-case times are taken in turns, so that the machine's other load (load average "
        "below) hits both alike.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| `augsearch predict` command, one case (process start included), median of "
        f"{len(cli['command_wall_s'])} | {cli['command_wall_median_s']:.2f} s |",
        f"| `augsearch predict` per case in a warm process, median of {len(paired['cli_per_case_s'])} | "
        f"{paired['cli_per_case_median_s']:.2f} s ({', '.join(f'{s:.2f}' for s in paired['cli_per_case_s'])}) |",
        f"| served, one request at a time, in turns with the line above, median | "
        f"{paired['served_median_s']:.2f} s ({', '.join(f'{s:.2f}' for s in paired['served_s'])}) |",
        f"| load: {load_['clients']} clients x {load_['requests_per_client']} requests | {load_['succeeded']} "
        f"succeeded, {load_['failed']} failed, {load_['not_sent_by_deadline']} not sent |",
        f"| latency p50 / p95 / max under load | {load_['latency_p50_s']:.2f} / {load_['latency_p95_s']:.2f} / "
        f"{load_['latency_max_s']:.2f} s |",
        f"| throughput | {load_['throughput_rps']:.3f} requests/s ({load_['wall_s']:.0f} s in all) |",
        f"| Segmenter replica RSS before / after the load | {', '.join(f'{v:.0f}' for v in before.values())} / "
        f"{', '.join(f'{v:.0f}' for v in replicas.values())} MiB |",
        "| Segmenter RSS after 25 / 50 / 75 / 100 % of the load | "
        + " / ".join(f"{row['segmenter_rss_mb']:.0f}" for row in quarters) + " MiB |",
        f"| machine load average (1 min) during the load, start / end | "
        f"{load_['machine_load_avg_1m'][0]:.1f} / {load_['machine_load_avg_1m'][1]:.1f} |",
        f"| one case in `predict_case`: windows through the segmenter; ms in it, in the rest of TTA, outside TTA "
        f"(read, preprocess, resample back) | {results['request_anatomy']['windows']}; "
        f"{results['request_anatomy']['model_ms']:.0f}, {results['request_anatomy']['tta_other_ms']:.0f}, "
        f"{results['request_anatomy']['outside_tta_ms']:.0f} |",
        f"| served segmentation equals `augsearch predict` | {results['served_equals_cli']} |",
        f"| after SIGTERM: exit code, processes left | {results['service']['shutdown']['exit_code']}, "
        f"{len(results['service']['shutdown']['left_running'])} |",
        "",
        "Cross-request batching: the segmenter's time per window "
        f"{results['window_batching']['patch_size']} by batch size (ms): "
        + ", ".join(f"{b}: {ms:.1f}" for b, ms in windows.items())
        + ". " + results["batching_decision"],
        "",
        *gpu_probe_lines(results),
        "Under load the requests queue at the single replica: latency is about the number of requests ahead times "
        "the one-request time, and throughput is one replica's rate. More replicas (`--replicas N`, one CPU or a "
        "GPU fraction each) raise it on a machine with the cores.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "serve-load")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--pairs", type=int, default=5, help="served vs CLI per-case timings, in turns")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=1800.0, help="no new request after this many seconds")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0,
                        help="> 0: the replica, `augsearch predict` and the batching probe run on CUDA")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    export, volume = make_export(args.work)
    scratch = args.work / "predict"
    shutil.rmtree(scratch, ignore_errors=True)
    device = "cuda" if args.gpus_per_replica > 0 else "cpu"
    cli = command_times(export, volume, scratch, device)
    windows = window_batching(export, device=device)
    anatomy = request_anatomy(export, volume, device)
    service = run_service(export, volume, args.work, args, warm_predict(export, volume, scratch, device))

    import nibabel as nib

    from augsearch.policy.io import load_policy

    per_window = windows["ms_per_window"]
    gain = per_window["8"] / min(per_window["16"], per_window["32"])
    decision = (f"Going from batch 8 (one request's batches) to 16-32 (two to four requests' windows together) "
                f"divides the time per window by {gain:.2f} on {windows['device']}; "
                + ("batching across requests would pay on this device." if gain > 1.15 else
                   "no gain worth a batching queue (one request's windows are already batched, all views "
                   "together)."))
    results = {
        "gpus_per_replica": args.gpus_per_replica, "date": datetime.date.today().isoformat(), "commit": commit(),
        "machine": machine(),
        "volume": {"name": volume.name, "shape": list(nib.load(str(volume)).shape), "bytes": volume.stat().st_size},
        "views": load_policy(export / "policy.json").tea_top_k,
        "cli": cli, "request_anatomy": anatomy, "window_batching": windows, "batching_decision": decision,
        "service": service,
        "served_equals_cli": same_segmentation(args.work / "served.nii.gz",
                                               scratch / "cli_0" / volume.name),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results, args.out / "README.md")
    print(json.dumps({k: results[k] for k in ("served_equals_cli", "batching_decision")}, indent=2))
    print(json.dumps(service["load"], indent=2))


if __name__ == "__main__":
    main()
