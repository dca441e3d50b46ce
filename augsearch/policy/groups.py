"""Class groups of a policy: which label values share one TRA categorical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from augsearch.errors import PolicyError

DEFAULT_GROUPS: tuple[str, str] = ("background", "foreground")


AGNOSTIC_GROUP = "all"


# Construction from the op registry


def normalise_labels(label_names: Mapping[str, int] | Sequence[str]) -> dict[str, int]:
    """dataset.json-style name -> value mapping; a list of names means values 0, 1, 2, ..."""
    if isinstance(label_names, Mapping):
        return {str(name): int(value) for name, value in label_names.items()}
    return {str(name): index for index, name in enumerate(label_names)}


def resolve_groups(
    label_names: Mapping[str, int], groups: Mapping[str, Sequence[str]] | None, *, class_specific: bool
) -> dict[str, tuple[int, ...]]:
    """Group name -> label values.

    class_specific=False: one group `all`. groups=None: `background` (label 0) and `foreground` (all other labels).
    Otherwise groups by label names; every label must belong to exactly one group.
    """
    labels = dict(label_names)
    if not class_specific:
        if groups is not None:
            raise PolicyError("groups were given with class_specific=False; drop the groups or set class_specific.")
        return {AGNOSTIC_GROUP: tuple(sorted(labels.values()))}
    if groups is None:
        if 0 not in labels.values():
            raise PolicyError(f"the default groups need a background label with value 0; labels are {labels}.")
        foreground = tuple(sorted(v for v in labels.values() if v != 0))
        if not foreground:
            raise PolicyError(f"the default groups need at least one foreground label; labels are {labels}.")
        return {"background": (0,), "foreground": foreground}
    out: dict[str, tuple[int, ...]] = {}
    owner: dict[str, str] = {}
    for group, names in groups.items():
        values = []
        for name in names:
            if name not in labels:
                raise PolicyError(
                    f"group {group!r} names label {name!r}, which is not a label of the dataset "
                    f"(labels: {sorted(labels)})."
                )
            if name in owner:
                raise PolicyError(
                    f"label {name!r} is in both groups {owner[name]!r} and {group!r}; every label must belong to "
                    "exactly one group."
                )
            owner[name] = group
            values.append(labels[name])
        out[group] = tuple(sorted(values))
    missing = [name for name in labels if name not in owner]
    if missing:
        raise PolicyError(
            f"labels {missing} belong to no group (groups: {dict(groups)}); every label must belong to exactly one "
            "group: add them to a group."
        )
    return out
