"""Import layers: each module imports augsearch modules from lower layers only (DESIGN.md), so data flows one way."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "augsearch"

# Lower number = lower layer. Modules in one subpackage (ops/, data/) may import each other.
LAYERS = {
    "augsearch": 0, "augsearch.errors": 0, "augsearch.atomic": 0,
    "augsearch.devices": 1,
    "augsearch.config": 1,
    "augsearch.ops": 2,
    "augsearch.policy": 3, "augsearch.model": 3, "augsearch.losses": 3, "augsearch.metrics": 3,
    "augsearch.inference": 3, "augsearch.schedules": 3,
    "augsearch.data.dataset": 3, "augsearch.data.synthetic": 3, "augsearch.data.check": 3,
    "augsearch.regularizers": 4, "augsearch.augment": 4, "augsearch.data.sampler": 4, "augsearch.checkpoint": 4,
    "augsearch.policy_io": 4,
    "augsearch.meta": 5, "augsearch.tta": 5, "augsearch.logit_diagnostic": 5, "augsearch.validation": 5,
    "augsearch.joint": 6, "augsearch.predict": 6,
    "augsearch.train": 7,
    "augsearch.export": 8,
    "augsearch.controller": 9,
    "augsearch.bench": 10, "augsearch.service": 10,
    "augsearch.cli": 11,
    "augsearch.__main__": 12,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(f"{module} has no layer; add it to LAYERS in tests/test_layers.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("augsearch")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("augsearch"):
            found.add(node.module)
    return found


def test_every_import_goes_down_the_layers():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == "augsearch":
            continue  # the package root re-exports lazily, by name
        for target in imports(path):
            own_submodule = target.startswith(name + ".")
            same_subpackage = name.split(".")[:2] == target.split(".")[:2] and name.count(".") >= 2
            if not (own_submodule or same_subpackage) and layer(target) >= layer(name):
                violations.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    assert not violations, "\n".join(violations)


def test_ray_and_higher_live_in_one_module_each():
    owners = {"ray": ("augsearch.controller", "augsearch.service"), "higher": "augsearch.meta",
              "kornia": "augsearch.ops"}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            for lib in names:
                if lib in owners:
                    assert module_name(path).startswith(owners[lib]), f"{module_name(path)} imports {lib}"
