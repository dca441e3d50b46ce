"""`augsearch policy validate|show|diff|schema|presets`: inspect, compare and check policy files."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("policy", help="validate, show, compare policy files; print the schema")
    sub = parser.add_subparsers(dest="policy_command", required=True, metavar="ACTION")

    validate = sub.add_parser("validate", help="check policy files; exit 1 if any is invalid")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=_validate)

    show = sub.add_parser("show", help="a table per class group: P(on) per op, likeliest bins; TEA top-K")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--bins", type=int, default=2, help="likeliest non-off bins shown per op (default 2)")
    show.add_argument("--png", default=None, metavar="OUT", help="also write a heatmap of bin probabilities per group")
    show.set_defaults(func=_show)

    diff = sub.add_parser("diff", help="probability changes between two policies; exit 1 if any exceeds the threshold")
    diff.add_argument("a", metavar="A")
    diff.add_argument("b", metavar="B")
    diff.add_argument("--threshold", type=float, default=0.02, help="smallest bin probability change shown")
    diff.set_defaults(func=_diff)

    schema = sub.add_parser("schema", help="print the JSON Schema of policy files")
    schema.set_defaults(func=_schema)

    presets = sub.add_parser("presets", help="list the presets, or write their files (2D and 3D)")
    presets.add_argument("--write", default=None, metavar="DIR", help="write <preset>-<dims>d.json files into DIR")
    presets.set_defaults(func=_presets)


def _validate(args: argparse.Namespace) -> int:
    from augsearch.policy.io import PolicyFileError, load_policy

    failed = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except PolicyFileError as err:
            failed += 1
            # the error names the file itself when it comes from the file's content
            print(f"INVALID {err}" if str(err).startswith(str(path)) else f"INVALID {path}: {err}")
        else:
            print(f"OK {path}: {policy.dims}D, {len(policy.op_names)} ops, groups {', '.join(policy.group_names)}")
    return 1 if failed else 0


def _fmt(p: float) -> str:
    return f"{p:.3f}"


def _show(args: argparse.Namespace) -> int:
    from augsearch.atomic import check_writable
    from augsearch.policy.io import load_policy

    if args.png:
        check_writable(args.png)
    policy = load_policy(args.file)
    probs = policy.tra_probs().detach().cpu()
    lines = [policy.summary(), f"dims {policy.dims}, sampling {policy.sampling}, temperature {policy.tau:g}"]
    if policy.sampling == "randaugment":
        lines.append(f"randaugment n={policy.randaugment_n} m={policy.randaugment_m}")
    width = max(len(name) for name in policy.op_names)
    members = policy.group_label_names()
    for g, group in enumerate(policy.group_names):
        lines += ["", f"group {group} (labels: {', '.join(members[group])})",
                  f"  {'op':<{width}}  P(on)  likeliest bins"]
        for k, name in enumerate(policy.op_names):
            row = probs[g, k]
            order = sorted(range(1, policy.n_bins[k]), key=lambda b: (-float(row[b]), b))[: args.bins]
            bins = ", ".join(f"{policy.op_bins[k][b].label} {_fmt(float(row[b]))}" for b in order if row[b] > 0)
            lines.append(f"  {name:<{width}}  {_fmt(1.0 - float(row[0]))}  {bins}")
    tea = policy.tea_probs().detach().cpu()
    lines += ["", f"TEA top-{policy.tea_top_k} (weight, probability):"]
    for i, weight in policy.tea_selected():
        lines.append(f"  {i:>3} {policy.tea_entries[i].name:<24} {_fmt(weight)}  {_fmt(float(tea[i]))}")
    print("\n".join(lines))
    if args.png:
        _heatmap(policy, args.png)
        print(f"wrote {args.png}")
    return 0


def _heatmap(policy, out: str) -> None:
    from augsearch.atomic import atomic_open
    from augsearch.service.figures import png_bytes, policy_heatmap

    with atomic_open(out, "wb") as handle:
        handle.write(png_bytes(policy_heatmap(policy)))


def _diff(args: argparse.Namespace) -> int:
    from augsearch.errors import AugsearchError
    from augsearch.policy.io import load_policy

    a, b = load_policy(args.a), load_policy(args.b)
    if a.dims != b.dims:
        raise AugsearchError(f"cannot compare a {a.dims}D policy with a {b.dims}D one; give two policies of one dims.")
    pa, pb = a.tra_probs().detach().cpu(), b.tra_probs().detach().cpu()
    lines = []
    for side, mine, theirs in (("A", a, b), ("B", b, a)):
        only_groups = [g for g in mine.group_names if g not in theirs.group_names]
        only_ops = [k for k in mine.op_names if k not in theirs.op_names]
        if only_groups:
            lines.append(f"groups only in {side}: {', '.join(only_groups)}")
        if only_ops:
            lines.append(f"ops only in {side}: {', '.join(only_ops)}")
    for group in (g for g in a.group_names if g in b.group_names):
        ga, gb = a.group_names.index(group), b.group_names.index(group)
        for name in (k for k in a.op_names if k in b.op_names):
            ka, kb = a.op_names.index(name), b.op_names.index(name)
            n = a.n_bins[ka]
            delta = pb[gb, kb, :n] - pa[ga, ka, :n]
            worst = int(delta.abs().argmax())
            if float(delta.abs().max()) > args.threshold:
                lines.append(
                    f"{group}/{name}: P(on) {1 - float(pa[ga, ka, 0]):.3f} -> {1 - float(pb[gb, kb, 0]):.3f}, "
                    f"largest change bin {a.op_bins[ka][worst].label} {float(pa[ga, ka, worst]):.3f} -> "
                    f"{float(pb[gb, kb, worst]):.3f}"
                )
    rank_a, rank_b = [i for i, _ in a.tea_selected()], [i for i, _ in b.tea_selected()]
    if rank_a != rank_b:
        names = a.tea_names
        lines.append(f"TEA top-K: A {[names[i] for i in rank_a]} -> B {[names[i] for i in rank_b]}")
    ta, tb = a.tea_probs().detach().cpu(), b.tea_probs().detach().cpu()
    if ta.shape == tb.shape:
        for i in _indices((tb - ta).abs() > args.threshold):
            lines.append(f"TEA {a.tea_names[i]}: {float(ta[i]):.3f} -> {float(tb[i]):.3f}")
    print("\n".join(lines) if lines else f"no probability differs by more than {args.threshold:g}")
    return 1 if lines else 0


def _indices(mask) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten().tolist()]


def _schema(args: argparse.Namespace) -> int:
    from augsearch.policy.io import policy_json_schema

    sys.stdout.write(json.dumps(policy_json_schema(), indent=2) + "\n")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from pathlib import Path

    from augsearch.atomic import write_json
    from augsearch.policy.presets import PRESETS, preset_document, preset_file_name

    if args.write is None:
        print("\n".join(PRESETS))
        return 0
    for name in PRESETS:
        for dims in (2, 3):
            path = Path(args.write) / preset_file_name(name, dims)
            write_json(path, preset_document(name, dims))
            print(f"wrote {path}")
    return 0
