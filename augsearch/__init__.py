"""augsearch: learned class-specific training-time and test-time augmentation for medical image segmentation.

Public API (imported on first use, so `import augsearch` stays light):
`Policy`, `make_policy`, `load_policy`, `save_policy`, `list_ops`, `PolicyAugmenter`, `fit`, `load_config`,
`predict_tta`, `TTAResult`, `metrics`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Policy": "augsearch.policy.core",
    "make_policy": "augsearch.policy.init",
    "load_policy": "augsearch.policy.io",
    "save_policy": "augsearch.policy.io",
    "list_ops": "augsearch.ops.registry",
    "PolicyAugmenter": "augsearch.policy.augmenter",
    "fit": "augsearch.train",
    "load_config": "augsearch.config",
    "predict_tta": "augsearch.predict.tta",
    "TTAResult": "augsearch.predict.tta",
}

__all__ = [*_EXPORTS, "metrics", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "metrics":
        return importlib.import_module("augsearch.metrics")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'augsearch' has no attribute {name!r}")
