"""The search space of a search config: `[search.space]` keys checked against the config, and trials drawn from it.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from augsearch.config import (
    ConfigError,
    ExperimentConfig,
    SearchConfig,
    apply_overrides,
    config_from_dict,
)
from augsearch.errors import SearchError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
# The params that place a trial of a shared search: its group (one point of the space, one policy server) and its
# worker index within the group.
SHARED_GROUP = "search.group"
SHARED_WORKER = "search.worker"


def config_keys() -> list[str]:
    """Every dotted leaf key of the config schema, e.g. 'augment.tra.lr', 'data.split.fold'."""
    keys: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            section = _section_type(field.annotation)
            if section is None:
                keys.append(prefix + name)
            else:
                walk(section, f"{prefix}{name}.")

    walk(ExperimentConfig, "")
    return keys


def _section_type(annotation: Any) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def validate_space(base: dict[str, Any], space: dict[str, Any]) -> None:
    """Check every space key names a config key and every value it can take validates; SearchError otherwise."""
    valid = config_keys()
    for key, spec in space.items():
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
            near += [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and k not in near]
            hint = ", ".join(near[:6]) if near else ", ".join(k for k in valid if k.startswith("augment.tra."))
            raise SearchError(
                f"search.space key {key!r} is not a config key; nearest valid keys: {hint}. "
                f"Space keys are dotted config keys such as augment.tra.lr or data.split.fold."
            )
        if key.startswith("search."):
            raise SearchError(f"search.space key {key!r} varies the search itself; vary training keys only")
        for value in _candidate_values(key, spec):
            try:
                config_from_dict(apply_overrides(base, {key: value}), source=f"search.space[{key!r}]")
            except ConfigError as err:
                raise SearchError(
                    f"search.space[{key!r}] can take {value!r}, which the config rejects:\n{err}"
                ) from None


def _candidate_values(key: str, spec: Any) -> list[Any]:
    """The values a space entry can produce (range ends for continuous ones), after checking its form."""
    form = (
        f"search.space[{key!r}] must be a list (grid), or one of {{choice=[...]}}, {{uniform=[a, b]}}, "
        f"{{loguniform=[a, b]}}, {{randint=[a, b]}} (b exclusive)"
    )
    if isinstance(spec, list):
        if not spec:
            raise SearchError(f"{form}; got an empty list")
        return spec
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SearchError(f"{form}; got {spec!r}")
    (kind, args), = spec.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SearchError(f"{form}; got choice={args!r}")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
            and args[0] < args[1]):
        raise SearchError(f"{form}; got {kind}={args!r}, which is not two increasing numbers")
    if kind == "loguniform" and args[0] <= 0:
        raise SearchError(f"{form}; got loguniform={args!r}, whose lower end must be positive")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise SearchError(f"{form}; got randint={args!r}, which needs integers")
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


def seeded_repeats(space: dict[str, Any], num_samples: int, seed: int) -> tuple[dict[str, Any], int]:
    """(space, num_samples) where the num_samples repeats of every point train with seeds seed, seed + 1, ...

    Without this, repeats of a point without random keys would be the same run twice. A space that sets `seed`
    itself is left as it is.
    """
    if num_samples == 1 or "seed" in space:
        return space, num_samples
    return {**space, "seed": [seed + i for i in range(num_samples)]}, 1


def expand_trials(space: dict[str, Any], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """In-process version of Tune's variant generation: grid product x num_samples, random keys drawn per trial."""
    rng = np.random.default_rng(seed)
    grid_keys = [k for k, v in space.items() if isinstance(v, list)]
    grid = list(itertools.product(*(space[k] for k in grid_keys)))
    trials = []
    for _ in range(num_samples):
        for point in grid:
            params = dict(zip(grid_keys, point))
            for key, spec in space.items():
                if isinstance(spec, dict):
                    params[key] = _draw(spec, rng)
            trials.append({key: params[key] for key in space})
    return trials


def trial_params(search: SearchConfig, seed: int) -> list[dict[str, Any]]:
    """Every trial's params, in order: the space's points x num_samples, or a shared search's members."""
    if search.policy_sharing == "shared":
        return shared_members(search.space, search.num_workers)
    return expand_trials(search.space, search.num_samples, seed)


def shared_members(space: dict[str, Any], num_workers: int) -> list[dict[str, Any]]:
    """The trials of a shared search, group by group: num_workers workers for every point of a grid-only space.

    Group g learns one policy on its own server; its workers differ in seed and shard only. The order matters: Tune
    starts trials in this order, so the workers of a group start together and no group waits on a later one.
    """
    points = expand_trials(space, 1, seed=0)  # a grid: nothing is drawn
    return [{SHARED_GROUP: g, SHARED_WORKER: w, **point} for g, point in enumerate(points) for w in range(num_workers)]


def _draw(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    (kind, args), = spec.items()
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    return int(rng.integers(args[0], args[1]))


PATH_KEYS = ("data.root", "data.cache_dir", "data.split.splits_file", "train.init_checkpoint", "augment.policy")


def absolute_paths(tree: dict[str, Any], space: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Config and space with relative paths made absolute: trials run in Ray's own working directories.

    data.root is always a path (it may not exist yet: the benchmark is generated there); the other keys only when
    they name an existing file or folder (augment.policy is otherwise a preset name).
    """
    def fix(key: str, value: Any) -> Any:
        if not isinstance(value, str) or Path(value).is_absolute():
            return value
        if key == "data.root" or Path(value).exists():
            return str(Path(value).resolve())
        return value

    def lookup(dotted: str) -> Any:
        node: Any = tree
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    tree = apply_overrides(tree, {key: fix(key, lookup(key)) for key in PATH_KEYS if lookup(key) is not None})
    space = json.loads(json.dumps(space))
    for key in PATH_KEYS:
        spec = space.get(key)
        if isinstance(spec, list):
            space[key] = [fix(key, v) for v in spec]
        elif isinstance(spec, dict) and "choice" in spec:
            spec["choice"] = [fix(key, v) for v in spec["choice"]]
    return tree, space
