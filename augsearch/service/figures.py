"""Figures of learned policies and of training runs, as matplotlib Figures (no pyplot state, no display needed).

Used by `augsearch policy show --png` (the heatmap) and by the HTML report. Histories are the per-epoch records of
`fit` (metrics.jsonl): TRA scalars `policy/<group>/<op>` = P(op applied), TEA scalars `tea/<entry>` = the entry's
probability while it is among the top-K, validation metrics `val/...`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from augsearch.policy.core import Policy

Record = Mapping[str, Any]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(figure: Any, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def policy_heatmap(policy: Policy) -> Any:
    """One panel per class group: ops (rows) x bins (columns) of the TRA probabilities; unavailable and padded
    bins are blank."""
    import numpy as np

    values = policy.tra_probs().detach().cpu().numpy().astype(float)
    values[:, ~policy.available.cpu().numpy()] = np.nan
    n_groups = len(policy.group_names)
    figure = _figure(1.5 + 4.2 * n_groups, 0.35 * len(policy.op_names) + 1.5)
    axes = figure.subplots(1, n_groups, squeeze=False)[0]
    for g, ax in enumerate(axes):
        image = ax.imshow(values[g], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(policy.group_names[g])
        ax.set_xlabel("bin (0 = off)")
        ax.set_yticks(range(len(policy.op_names)))
        ax.set_yticklabels(policy.op_names if g == 0 else [])
    figure.colorbar(image, ax=list(axes), label="probability")
    return figure


def _series(history: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
    """Epochs and finite values of KEY over a history (epochs without it are left out)."""
    points = [(int(r["epoch"]), float(r[key])) for r in history
              if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [e for e, _ in points], [v for _, v in points]


def _prefixed(history: Sequence[Record], prefix: str) -> list[str]:
    """Keys starting with PREFIX in any record, in first-seen order."""
    seen: dict[str, None] = {}
    for record in history:
        for key in record:
            if key.startswith(prefix):
                seen.setdefault(key, None)
    return list(seen)


def tra_trajectories(history: Sequence[Record], groups: Sequence[str]) -> Any:
    """One panel per class group: P(op applied) of each op over the epochs."""
    figure = _figure(1.5 + 4.6 * len(groups), 3.6)
    axes = figure.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    colors = _colors(max(len(_prefixed(history, f"policy/{g}/")) for g in groups))
    for ax, group in zip(axes, groups):
        for color, key in zip(colors, _prefixed(history, f"policy/{group}/")):
            ax.plot(*_series(history, key), color=color, label=key.rsplit("/", 1)[-1])
        ax.set_title(f"{group}: P(op applied)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    return figure


def tea_panels(policy: Policy, history: Sequence[Record]) -> Any:
    """Left: the weights of the policy's top-K TEA entries. Right: each entry's probability over the epochs while
    it was among the top-K."""
    figure = _figure(10.5, 3.4)
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.6])
    selected = policy.tea_selected()
    names = [policy.tea_names[i] for i, _ in selected]
    left.barh(range(len(selected)), [w for _, w in selected], color="#4c72b0")
    left.set_yticks(range(len(selected)))
    left.set_yticklabels(names)
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel("weight at test time")
    left.set_title(f"TEA top-{policy.tea_top_k}")
    keys = _prefixed(history, "tea/")
    keys = [k for k in keys if k != "tea/loss"]
    for color, key in zip(_colors(len(keys)), keys):
        right.plot(*_series(history, key), marker=".", color=color, label=key.split("/", 1)[1])
    right.set_title("TEA probability over training (while in the top-K)")
    right.set_xlabel("epoch")
    right.grid(alpha=0.3)
    if keys:
        right.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    return figure


def curves(histories: Mapping[str, Sequence[Record]], keys: Sequence[str]) -> Any:
    """One panel per metric key, one line per run (trial) over the epochs."""
    figure = _figure(1.0 + 4.0 * len(keys), 3.4)
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    colors = _colors(len(histories))
    for ax, key in zip(axes, keys):
        for color, (label, history) in zip(colors, histories.items()):
            ax.plot(*_series(history, key), marker="." if len(history) < 30 else None, color=color, label=label)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if 1 < len(histories) <= 12:
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small", frameon=False)
    return figure


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]
