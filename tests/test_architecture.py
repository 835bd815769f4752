"""The package keeps its shape: computed from the code itself with ``ast``, so a rule cannot drift from what it checks.

See DESIGN.md, "Model families", "Who may import whom" and "Folders". The static checks parse ``jaxmap/`` and import
none of it (so no jax in this process); only the planning check runs the plan command, in a subprocess that cannot
import jax.

Imports are read wherever they are (module level, functions, class bodies, ``try`` blocks) and resolved as Python
would: ``from jaxmap.pkg import name`` is a dependency on the module ``jaxmap.pkg.name`` when that is a module, else on
``jaxmap.pkg``; relative imports are resolved against the importing module; ``importlib.import_module("jaxmap.x")``
with a literal name counts too. A lazy re-export through a module-level ``__getattr__`` (``jaxmap.quant``,
``jaxmap`` itself) is statically a dependency on that package only. Importing ``jaxmap.a.b`` is not counted as
importing ``jaxmap.a``'s ``__init__`` (every module would otherwise depend on every package above it).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxmap"
MAX_LINES = 600

# Per-layer (and outer) tensor names as Hugging Face and GGUF files spell them. Only jaxmap/families/ may spell them
# (DESIGN.md, "Model families"); everything else asks the family. Matched as whole names: not inside a longer
# identifier (``attn_q`` does not match ``attn_q_norm``, ``lm_head`` does not match ``lm_heads``), anywhere in a
# literal, dotted or not (``"q_proj"``, ``"self_attn.q_proj"``, ``"blk.0.attn_q.weight"``, ``"/model\\.norm/"``).
# A jaxmap-internal key spelled like a file name (``"lm_head"``, ``"embed_tokens"``, ``"attn_norm"``) is reported
# too: the check cannot tell the two apart, and neither can a reader; such keys get a name of jaxmap's own.
# Names of tensors in model files. FILE_ONLY_NAMES are never anything but a file's tensor name, so they count wherever
# they stand; SHARED_NAMES are also jaxmap's own keys (a layer's "attn_norm", a stage's "embed_tokens" and "lm_head",
# the DeviceMap's lm_head placement), so they count only joined by a dot to another part of a name
# ("lm_head.weight", "model.embed_tokens", "blk.0.attn_norm").
FILE_ONLY_NAMES = (
    # Hugging Face
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
    "input_layernorm", "post_attention_layernorm", "self_attn", "model.layers", "model.norm",
    # GGUF
    "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
    "ffn_down", "ffn_gate", "ffn_up", "ffn_norm", "token_embd", "output_norm", "output.weight", "blk",
)
SHARED_NAMES = ("embed_tokens", "lm_head", "q_norm", "k_norm", "attn_norm")
TENSOR_NAMES = FILE_ONLY_NAMES + SHARED_NAMES


# jaxmap/cli/ modules that are shared helpers, not commands; every other module there is a command.
CLI_HELPERS = ("jaxmap.cli", "jaxmap.cli.common", "jaxmap.cli.verdict")

# Importer markers in LAYER_RULES.
ANY = "<any module>"
ENTRY_MODULES = "<entry modules>"

# Top-level distributions that are jax (or need it at import).
JAX = ("jax", "jaxlib", "flax", "orbax")


@dataclass(frozen=True)
class Rule:
    """What the modules of ``layer`` may import from jaxmap (DESIGN.md, "Who may import whom").

    ``only``: when given, the only jaxmap packages/modules they may import. ``never``: ones they must not import,
    except those under ``allow``. ``exempt``: importers inside ``layer`` the rule does not apply to. A name means that
    module and everything under it, except ``"jaxmap"``, which means the top-level package alone (its lazy
    ``__getattr__`` reaches ``jaxmap.api``).
    """

    layer: str
    why: str
    only: tuple[str, ...] = ()
    never: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()


_ABOVE_PLAN = ("jaxmap.loading", "jaxmap.materialize", "jaxmap.engine", "jaxmap.cli", "jaxmap.api",
               "jaxmap.calibrate", "jaxmap.library", "jaxmap")

LAYER_RULES = (
    Rule("jaxmap.config", "config (ModelConfig, presets, hardware, dtypes) is the bottom layer",
         only=("jaxmap.errors", "jaxmap.config")),
    Rule("jaxmap.families", "family declarations read config only (the planner imports them without jax)",
         only=("jaxmap.errors", "jaxmap.config", "jaxmap.families")),
    Rule("jaxmap.quant", "quant (formats, quantizers, kernels) sits on config",
         only=("jaxmap.errors", "jaxmap.config", "jaxmap.quant")),
    Rule("jaxmap.planning", "planning is pure data: config, families' declarations and the quant type table",
         never=(*_ABOVE_PLAN, "jaxmap.quant"), allow=("jaxmap.quant.types",)),
    Rule("jaxmap.loading", "loading reads files; it knows nothing of placing or running them",
         never=("jaxmap.materialize", "jaxmap.engine", "jaxmap.cli", "jaxmap.api", "jaxmap.calibrate",
                "jaxmap.library", "jaxmap")),
    Rule("jaxmap.materialize", "materialize turns a plan and a source into arrays; it does not run them",
         never=("jaxmap.engine", "jaxmap.cli", "jaxmap.api", "jaxmap.calibrate", "jaxmap")),
    Rule("jaxmap.engine", "the engine runs materialize's output; it never reads files",
         never=("jaxmap.loading", "jaxmap.cli", "jaxmap.api", "jaxmap.calibrate", "jaxmap")),
    Rule(ANY, "only the command line imports the command line",
         never=("jaxmap.cli",), exempt=("jaxmap.cli", ENTRY_MODULES)),
)

# Layers that must import without jax (DESIGN.md: config, plan and families' declarations "never jax"; the quant
# type table is what the planner reads). Checked at module level: a function may import jax when called
# (``Hardware.from_jax``), which planning for hardware you lack never does.
JAX_FREE = ("jaxmap.errors", "jaxmap.config", "jaxmap.families", "jaxmap.planning", "jaxmap.quant.types")


# ----------------------------------------------------------------------------------------------------------------------
# Reading the package


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a jaxmap module, or the full dotted name of an outside one
    internal: bool
    line: int
    module_level: bool  # runs when the importer is imported (not inside a function)
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    lines: int

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


@cache
def modules() -> dict[str, Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        source = path.read_text(encoding="utf-8")
        out[name] = Module(name, path, is_package, ast.parse(source, filename=str(path)), len(source.splitlines()))
    return out


def within(module: str, prefix: str) -> bool:
    if prefix == "jaxmap":
        return module == "jaxmap"
    return module == prefix or module.startswith(prefix + ".")


def _longest_module(dotted: str) -> str | None:
    """``dotted`` itself when it is a jaxmap module, else its longest prefix that is one."""
    known = modules()
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def _targets(module: Module, node: ast.AST) -> list[tuple[str, bool]]:
    """(target, internal) for one import statement or ``importlib.import_module("...")`` call."""
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
        return [(_longest_module(n), True) if n.split(".")[0] == "jaxmap" else (n, False) for n in found]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.name if module.is_package else module.name.rpartition(".")[0]
            base_parts = package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] != "jaxmap":
            return [(base, False)]
        out = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append((sub if sub in modules() else _longest_module(base), True))
        return out
    # importlib.import_module("literal")
    arg = node.args[0].value  # type: ignore[attr-defined]
    return [(_longest_module(arg), True) if arg.split(".")[0] == "jaxmap" else (arg, False)]


def _is_import_module_call(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@cache
def imports() -> tuple[Import, ...]:
    found: list[Import] = []

    def visit(module: Module, node: ast.AST, module_level: bool, type_only: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_import_module_call(node):
            for target, internal in _targets(module, node):
                if target is not None:
                    found.append(Import(module.name, target, internal, node.lineno, module_level, type_only))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            visit(module, node.test, module_level, type_only)
            for child in node.body:
                visit(module, child, module_level, True)
            for child in node.orelse:
                visit(module, child, module_level, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(module, child, module_level, type_only)

    for module in modules().values():
        visit(module, module.tree, True, False)
    return tuple(found)


def internal_imports() -> list[Import]:
    return [i for i in imports() if i.internal and i.target != i.importer]


def fail_if(problems: list[str], header: str) -> None:
    """Fail with every problem on its own line (no assertion rewriting of the list: the lines are the message)."""
    if problems:
        pytest.fail(header + "\n" + "\n".join(problems), pytrace=False)


def where(imp: Import) -> str:
    scope = "" if imp.module_level else " (in a function)"
    return f"{modules()[imp.importer].rel}:{imp.line}{scope}"


def commands() -> set[str]:
    return {m for m in modules() if within(m, "jaxmap.cli") and m not in CLI_HELPERS}


def entry_modules() -> set[str]:
    """``jaxmap.<command>`` for each command that has one (``python -m jaxmap.plan``)."""
    return {f"jaxmap.{c.rpartition('.')[2]}" for c in commands()} & set(modules())


# ----------------------------------------------------------------------------------------------------------------------
# 1. No import cycles


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle through all of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def _path(graph: dict[str, set[str]], start: str, goal: str, inside: set[str]) -> list[str]:
    """Shortest import chain start -> ... -> goal through modules of ``inside`` (breadth first)."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w in inside and w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
        if goal in previous:
            break
    chain = [goal]
    while previous[chain[-1]] is not None:
        chain.append(previous[chain[-1]])  # type: ignore[arg-type]
    return chain[::-1]


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], Import] = {}
    for imp in internal_imports():
        if imp.type_only:
            continue
        graph.setdefault(imp.importer, set()).add(imp.target)
        lines.setdefault((imp.importer, imp.target), imp)
    report = []
    for component in _cycles(graph):
        members = set(component)
        head = component[0]
        back = min((v for v in members if head in graph.get(v, ())), key=lambda v: len(_path(graph, head, v, members)))
        cycle = _path(graph, head, back, members) + [head]
        steps = [f"    {a} -> {b}  ({where(lines[(a, b)])})" for a, b in zip(cycle, cycle[1:], strict=False)]
        lazy = sorted(f"    {i.importer} -> {i.target}  ({where(i)})" for i in internal_imports()
                      if not i.module_level and not i.type_only and {i.importer, i.target} <= members)
        report.append(f"  cycle among {len(component)} modules: {', '.join(component)}\n  for example:\n"
                      + "\n".join(steps) + "\n  imports inside functions within these modules:\n"
                      + "\n".join(lazy or ["    (none)"]))
    fail_if(report, "import cycles (imports inside functions count):")


# ----------------------------------------------------------------------------------------------------------------------
# 2. Commands stay separate


def test_commands_are_imported_only_by_their_entry_module():
    cmds, entries = commands(), entry_modules()
    assert {"jaxmap.cli.plan", "jaxmap.cli.generate"} <= cmds, f"commands not found under jaxmap/cli/: {sorted(cmds)}"
    bad = []
    for imp in internal_imports():
        if imp.target not in cmds | entries:
            continue
        own_entry = imp.target in cmds and imp.importer == f"jaxmap.{imp.target.rpartition('.')[2]}"
        if own_entry:
            continue
        if imp.importer in cmds:
            kind = "a command module imports another command module"
        elif imp.importer in entries:
            kind = "an entry module imports a command other than its own"
        elif within(imp.importer, "jaxmap.cli"):
            kind = "a cli helper imports a command module"
        else:
            kind = "a module outside the command line imports a command module"
        bad.append(f"  {where(imp)}: {imp.importer} imports {imp.target}: {kind}")
    fail_if(sorted(bad), "command modules (jaxmap/cli/<command>.py and the entry modules jaxmap/<command>.py) are "
            "imported only by their own entry module; shared code goes in cli/common.py, cli/verdict.py or below:")


def test_entry_modules_are_thin():
    cmds = commands()
    missing = sorted(c for c in cmds if f"jaxmap.{c.rpartition('.')[2]}" not in modules())
    bad = []
    for entry in sorted(entry_modules()):
        command = f"jaxmap.cli.{entry.rpartition('.')[2]}"
        extra = sorted({i.target for i in internal_imports() if i.importer == entry} - {command})
        if extra:
            bad.append(f"  {modules()[entry].rel} imports {', '.join(extra)} (it should import only {command}.main)")
        if modules()[entry].lines > 30:
            bad.append(f"  {modules()[entry].rel} has {modules()[entry].lines} lines (an entry module is a few)")
    bad += [f"  {modules()[c].rel} has no entry module jaxmap/{c.rpartition('.')[2]}.py" for c in missing]
    fail_if(bad, "entry modules are thin wrappers over jaxmap.cli.<command>, one per command:")


# ----------------------------------------------------------------------------------------------------------------------
# 3. Who may import whom


def _applies(rule: Rule, module: str) -> bool:
    if rule.layer != ANY and not within(module, rule.layer):
        return False
    for exempt in rule.exempt:
        if module in entry_modules() if exempt == ENTRY_MODULES else within(module, exempt):
            return False
    return True


def _breaks(rule: Rule, target: str) -> bool:
    if rule.only and not any(within(target, ok) for ok in rule.only):
        return True
    return any(within(target, no) for no in rule.never) and not any(within(target, ok) for ok in rule.allow)


def test_layers_import_only_what_design_allows():
    for rule in LAYER_RULES:
        if rule.layer != ANY:
            assert any(within(m, rule.layer) for m in modules()), f"LAYER_RULES names {rule.layer}, which is gone"
    bad = []
    for imp in internal_imports():
        for rule in LAYER_RULES:
            if _applies(rule, imp.importer) and _breaks(rule, imp.target):
                layer = "every module" if rule.layer == ANY else rule.layer
                allowed = (f"may import only {', '.join(rule.only)}" if rule.only
                           else f"never imports {', '.join(n for n in rule.never if within(imp.target, n))}")
                bad.append(f"  {where(imp)}: {imp.importer} imports {imp.target}; {layer} {allowed} ({rule.why})")
    fail_if(sorted(bad), "layer rules broken (DESIGN.md, 'Who may import whom'):")


def test_jax_free_layers_import_no_jax_at_module_level():
    """What planning reads imports no jax when imported: directly, or through the jaxmap modules it imports."""
    graph: dict[str, list[Import]] = {}
    for imp in imports():
        if imp.module_level and not imp.type_only:
            graph.setdefault(imp.importer, []).append(imp)
    bad = []
    for start in sorted(m for m in modules() if any(within(m, layer) for layer in JAX_FREE)):
        chain_to: dict[str, list[str]] = {start: [start]}
        todo = [start]
        while todo:
            current = todo.pop()
            for imp in graph.get(current, []):
                if not imp.internal and imp.target.split(".")[0] in JAX:
                    via = " -> ".join(chain_to[current])
                    bad.append(f"  {start}: {via} imports {imp.target} at {where(imp)}")
                elif imp.internal and imp.target not in chain_to:
                    chain_to[imp.target] = [*chain_to[current], imp.target]
                    todo.append(imp.target)
    fail_if(sorted(set(bad)), f"modules of {', '.join(JAX_FREE)} must import without jax (import it inside the "
            "function that needs it):")


# ----------------------------------------------------------------------------------------------------------------------
# 4. Planning runs without jax

_MARK = "JAXMAP-ARCHITECTURE-TRIED-JAX:"

_PLAN_WITHOUT_JAX = textwrap.dedent(f"""
    import builtins, json, sys, traceback

    BLOCKED = {JAX!r}
    for name in BLOCKED:
        sys.modules[name] = None  # any import of these now fails
    tried = []
    real_import = builtins.__import__

    def spying_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] in BLOCKED:  # recorded too when the ImportError is swallowed
            frame = traceback.extract_stack(limit=2)[0]
            tried.append(f"{{name}} from {{frame.filename}}:{{frame.lineno}}")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = spying_import
    try:
        from jaxmap.cli.plan import main

        code = main(sys.argv[1:])
    finally:
        sys.stdout.flush()
        print("\\n{_MARK}" + json.dumps(tried), file=sys.stderr)
    sys.exit(code)
""")


def _preset(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "models" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("model", ["llama-3-70b", "qwen3-8b"])
def test_planning_imports_no_jax(model):
    if not (ROOT / "models" / f"{model}.yaml").is_file():
        pytest.skip(f"models/{model}.yaml is not there yet (the {model} preset is being added); nothing to plan")
    args = ["-m", model, "--mesh", "8xh100", "--isq", "Q4K", "--json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", _PLAN_WITHOUT_JAX, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    shown = f"python -m jaxmap.plan {' '.join(args)} with jax unimportable"
    tried = next((json.loads(line[len(_MARK):]) for line in out.stderr.splitlines() if line.startswith(_MARK)), None)
    assert out.returncode == 0, f"{shown} exited {out.returncode}:\n{out.stderr[-4000:]}"
    assert tried == [], f"{shown} tried to import jax (ImportError swallowed?):\n  " + "\n  ".join(tried or ["?"])
    plan = json.loads(out.stdout)
    layers = _preset(model)["num_hidden_layers"]
    if model == "llama-3-70b":
        assert layers == 80
    assert plan["num_layers"] == layers and len(plan["layers"]) == layers, (plan["num_layers"], len(plan["layers"]))
    devices = {d for layer in plan["layers"] for d in layer["devices"]}
    assert devices and all(re.fullmatch(r"cuda\[\d+\]", d) for d in devices), sorted(devices)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Only families spell tensor names

def _alternation(names: tuple[str, ...]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_TENSOR_NAME = re.compile(r"(?<![A-Za-z0-9_])(?:" + _alternation(FILE_ONLY_NAMES) + r")(?![A-Za-z0-9_])"
                          r"|(?<![A-Za-z0-9_])[A-Za-z0-9_]+\.(?:" + _alternation(SHARED_NAMES) + r")(?![A-Za-z0-9_])"
                          r"|(?<![A-Za-z0-9_])(?:" + _alternation(SHARED_NAMES) + r")\.[A-Za-z0-9_]")


def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                    str):
                out.add(id(first.value))
    return out


def _dunder_all(tree: ast.Module) -> set[int]:
    """String constants listed in ``__all__``: they name identifiers (not checked), not tensors."""
    out = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            out |= {id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
    return out


def test_only_families_spell_tensor_names():
    bad = []
    for module in modules().values():
        if within(module.name, "jaxmap.families"):
            continue
        skip = _docstrings(module.tree) | _dunder_all(module.tree)
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                names = sorted(set(_TENSOR_NAME.findall(node.value.replace("\\", ""))))
                if names:
                    bad.append((module.rel, node.lineno, f"{node.value!r} spells {', '.join(names)}"))
    fail_if([f"  {path}:{line}: {what}" for path, line, what in sorted(bad)],
            f"{len(bad)} string literals outside jaxmap/families/ spell a Hugging Face or GGUF tensor name (the family "
            "owns its names: ask it; an internal key spelled like one gets a name of jaxmap's own):")


# ----------------------------------------------------------------------------------------------------------------------
# 6. Files stay small


def test_no_module_over_the_line_limit():
    long = sorted((m.lines, m.rel) for m in modules().values() if m.lines > MAX_LINES)
    fail_if([f"  {p}: {n} lines" for n, p in long], f"modules over {MAX_LINES} lines (split them by job):")

