"""The package's structure (the media package has its own, tests/media/test_layout.py): no import cycles,
front doors side by side over the engine (none imports another; nothing below them imports one), at most 8
floors of imports under the front doors, and no module past ~450 lines."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import owlvid

ROOT = Path(owlvid.__file__).parent
FRONT_DOORS = {"owlvid.server", "owlvid.batch", "owlvid.eval"}
# above the front doors: the command line dispatches to all of them; Ray scales out batch jobs, the server and
# evaluation
ENTRY = {"owlvid.cli", "owlvid.__main__", "owlvid.ray", "owlvid.ray_eval"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """owlvid modules `module` imports anywhere (inside functions too; not under `if TYPE_CHECKING:`)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m) for m in MODULES}


def room(module: str) -> str:
    """The unit of the floor plan: a top-level module, or a package (server, eval, media, requests, testing,
    each model family)."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "models":
        return ".".join(parts[:3])
    return ".".join(parts[:2])


ROOMS: dict[str, set[str]] = {}
for _m, _deps in GRAPH.items():
    ROOMS.setdefault(room(_m), set()).update(room(d) for d in _deps if room(d) != room(_m))


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d] if d in path
                                                                    else path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_front_doors_stand_side_by_side_over_the_engine():
    for m, deps in GRAPH.items():
        if room(m) in ENTRY:
            continue
        doors = {room(d) for d in deps} & FRONT_DOORS - {room(m)}
        assert not doors, f"{m} imports the front door(s) {sorted(doors)}"
        assert not {room(d) for d in deps} & ENTRY, f"{m} imports an entry point"


def test_at_most_eight_floors_under_the_entry_points():
    @functools.lru_cache(None)
    def floors(r: str) -> int:
        return 1 + max((floors(d) for d in ROOMS[r]), default=0)

    deepest = {r: floors(r) for r in ROOMS if r not in ENTRY}
    assert max(deepest.values()) <= 8, sorted(deepest.items(), key=lambda kv: -kv[1])[:5]
    assert {r: deepest[r] for r in FRONT_DOORS} == dict.fromkeys(FRONT_DOORS, max(deepest.values()))


def test_no_module_past_450_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}, f"split these modules: {long}"


def test_model_families_fill_in_the_skeleton(tiny_owl3_models, tmp_path):
    """Every family's top-level module is a `VisionLanguageModel`: the names tools read exist on each (no
    probing), `lm_head` is None exactly when tied to the embedding."""
    from torch import nn

    from owlvid.models.base import VisionLanguageModel
    from owlvid.testing.slowfast import make_tiny_slowfast

    models = [m.runtime.model for m in tiny_owl3_models.values()]
    models.append(owlvid.load(make_tiny_slowfast(tmp_path / "sf"), dtype="float32", device="cpu").runtime.model)
    for model in models:
        assert isinstance(model, VisionLanguageModel)
        assert isinstance(model.vision, nn.Module) and isinstance(model.projector, nn.Module)
        assert (model.lm_head is None) == model.cfg.llm.tie_word_embeddings
        assert model.vision in model.modules() and model.projector in model.modules()
