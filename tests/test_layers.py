"""Import layers: each module imports augsearch modules from lower layers only (DESIGN.md), so data flows one way."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "augsearch"

# Floors from the bottom: a module imports augsearch modules from lower floors only; modules of one package (ops/,
# data/, policy/, ...) may import each other. DESIGN.md's floor list is written from this table
# (tests/test_design_floors.py holds them equal).
FLOORS = [
    ("augsearch", "augsearch.errors", "augsearch.atomic", "augsearch.textfiles"),
    ("augsearch.config", "augsearch.devices", "augsearch.schedules"),
    ("augsearch.ops",),
    ("augsearch.augment", "augsearch.model", "augsearch.losses", "augsearch.data", "augsearch.context_labels"),
    ("augsearch.lesion_metrics", "augsearch.regularizers", "augsearch.artifacts"),
    ("augsearch.metrics",),
    ("augsearch.policy",),
    ("augsearch.learn",),
    ("augsearch.predict",),
    ("augsearch.train",),
    ("augsearch.tune",),
    ("augsearch.service",),
    ("augsearch.bench",),
    ("augsearch.cli",),
    ("augsearch.__main__",),
]
LAYERS = {module: floor for floor, modules in enumerate(FLOORS) for module in modules}


DESIGN = PACKAGE.parent / "DESIGN.md"


def render_floors() -> str:
    """DESIGN.md's floor list, written from FLOORS (top floor first)."""
    lines = [f"{len(FLOORS) - 1 - i:2d}  " + "  ".join(m.removeprefix("augsearch.") if m != "augsearch" else "augsearch"
                                                 for m in modules)
             for i, modules in enumerate(reversed(FLOORS))]
    return "\n".join(lines)


def test_design_md_lists_the_floors_of_this_table():
    text = DESIGN.read_text()
    block = text.split("<!-- floors -->\n```\n", 1)[1].split("\n```\n<!-- /floors -->", 1)[0]
    assert block == render_floors(), "regenerate DESIGN.md's floor list: python -c 'import tests.test_layers as t; " \
        "print(t.render_floors())'"


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
    owners = {"ray": ("augsearch.tune.ray_tune", "augsearch.learn.server", "augsearch.service"),
              "higher": ("augsearch.learn.meta",), "kornia": ("augsearch.ops",)}
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
