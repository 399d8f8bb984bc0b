"""Rewrite imports of vramcalc modules that the regroup (issue 26, Deliver 4) moved.

    python tools/regroup_imports.py [--check] [PATH ...]

`MOVED` below is the old -> new module map of the regroup commit. Every file under the
given paths (default: src tests bench calibration docs tools README.md setup.py
pyproject.toml .ci) whose suffix is in `TEXT_SUFFIXES` (or has none, like .ci/run) is
rewritten in place:

- `from vramcalc import specs` / `from vramcalc import specs as s, api` -> one
  `from vramcalc.models import spec as specs` line per moved module (the bound name is
  kept), the names that did not move stay on the original statement;
- every dotted name `vramcalc.old.module[.attr]`, wherever it appears: `from vramcalc.x
  import`, `import vramcalc.x`, attribute chains, strings (lazy imports, monkeypatch
  targets), `python -m vramcalc.x` in docs;
- every path `vramcalc/old/module.py` (also .pyi, .c), e.g. `src/vramcalc/specs.py` in
  comments and docs, and every moved test file's path (`TESTS_MOVED`), e.g.
  `tests/test_specs.py` -> `tests/models/test_specs.py`.

A new test file on another branch still lands in tests/; move it with `git mv` next to
the tests of its module.

A dotted name is rewritten by its longest prefix that is an old or a new module name, and
only when that prefix is an old one, so running the script twice changes nothing the
second time (`vramcalc.corrections.factors.x` is already new; `vramcalc.corrections.x`
is the old module). Data files (.json, .jsonl) are not touched: the calibration
records name only `vramcalc.calibrate.*`, which did not move.

After it, `ruff check --fix --select I` re-sorts the rewritten import blocks. `--check`
lists the files it would change and exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# old module -> new module (the regroup commit: `git mv`, content unchanged but imports)
MOVED: dict[str, str] = {
    # models/: what a model is and where it comes from
    "vramcalc.specs": "vramcalc.models.spec",
    "vramcalc.catalog_index": "vramcalc.models.catalog_index",
    "vramcalc.hf_config": "vramcalc.models.hf_config",
    "vramcalc.hub": "vramcalc.models.hub",
    # memory/: the estimator, its result and the engine behind it
    "vramcalc.estimate": "vramcalc.memory.estimate",
    "vramcalc.result": "vramcalc.memory.result",
    "vramcalc.effective": "vramcalc.memory.effective",
    "vramcalc.inference": "vramcalc.memory.inference",
    "vramcalc.multi_gpu": "vramcalc.memory.multi_gpu",
    # memory/program/: the tensors of a step and the requests they make
    "vramcalc.step_requests": "vramcalc.memory.program.step",
    "vramcalc.step_templates": "vramcalc.memory.program.templates",
    "vramcalc.load_requests": "vramcalc.memory.program.load",
    "vramcalc.infer_requests": "vramcalc.memory.program.infer",
    "vramcalc.activations": "vramcalc.memory.program.activations",
    "vramcalc.logits": "vramcalc.memory.program.logits",
    "vramcalc.weights": "vramcalc.memory.program.weights",
    "vramcalc.optimizer": "vramcalc.memory.program.optimizer",
    "vramcalc.trainable": "vramcalc.memory.program.trainable",
    # memory/allocator/: the simulated CUDA caching allocator
    "vramcalc.allocator": "vramcalc.memory.allocator.constants",
    "vramcalc.allocator_replay": "vramcalc.memory.allocator.replay",
    "vramcalc._replay": "vramcalc.memory.allocator._replay",
    # sizing/: does it fit, what fits, what to change
    "vramcalc.verdict": "vramcalc.sizing.verdict",
    "vramcalc.search": "vramcalc.sizing.search",
    "vramcalc.advice": "vramcalc.sizing.advice",
    "vramcalc.comparison": "vramcalc.sizing.comparison",
    # corrections/: fitted factors, the measured points they are fitted on, applying them
    "vramcalc.corrections": "vramcalc.corrections.factors",
    "vramcalc.calibration_data": "vramcalc.corrections.points",
    "vramcalc.planning": "vramcalc.corrections.planning",
    # timing/: step time and cost (not `time`: that would shadow the standard library's)
    "vramcalc.step_time": "vramcalc.timing.step_time",
    "vramcalc.time_cost": "vramcalc.timing.cost",
    "vramcalc.gpu_speed": "vramcalc.timing.gpu_speed",
    # hardware/: the GPU catalog and the GPUs of this machine
    "vramcalc.gpu_catalog": "vramcalc.hardware.catalog",
    "vramcalc.gpus": "vramcalc.hardware.devices",
    # the plan types
    "vramcalc.plan_settings": "vramcalc.plans",
}

# names moved out of a module after the regroup commit (to break import circles): old
# dotted name -> new; `from M import NAME` is split and `as NAME` keeps the bound name
SYMBOLS_MOVED: dict[str, str] = {
    # models/resolve.py: the one door, so spec.py needs neither hf_config nor hub
    "vramcalc.models.spec.resolve_model": "vramcalc.models.resolve.resolve_model",
    # commands/targets.py: the cards of plan and check (task_options imported both)
    "vramcalc.commands.check._detect_devices": "vramcalc.commands.targets.detect_devices",
    "vramcalc.commands.check._targets": "vramcalc.commands.targets.check_targets",
    "vramcalc.commands.plan._target": "vramcalc.commands.targets.plan_target",
    # calibrate/campaign.py: what `calibrate` and `calibrate multi` both use
    "vramcalc.commands.calibrate._fetch_weights": "vramcalc.calibrate.campaign.fetch_weights",
    "vramcalc.commands.calibrate.NO_EXTRA": "vramcalc.calibrate.campaign.NO_EXTRA",
    # plans.py: the inference and merge plan types; memory/program/kv_cache.py: what
    # the inference estimate and the generate() program share (they imported each other)
    "vramcalc.memory.inference.InferQuant": "vramcalc.plans.InferQuant",
    "vramcalc.memory.inference.Dtype16": "vramcalc.plans.Dtype16",
    "vramcalc.memory.inference.AdapterDtype": "vramcalc.plans.AdapterDtype",
    "vramcalc.memory.inference.CacheKind": "vramcalc.plans.CacheKind",
    "vramcalc.memory.inference.MergeOn": "vramcalc.plans.MergeOn",
    "vramcalc.memory.inference.MergeBase": "vramcalc.plans.MergeBase",
    "vramcalc.memory.inference.CACHES": "vramcalc.plans.CACHES",
    "vramcalc.memory.inference.ADAPTER_DTYPES": "vramcalc.plans.ADAPTER_DTYPES",
    "vramcalc.memory.inference.INFER_QUANTS": "vramcalc.plans.INFER_QUANTS",
    "vramcalc.memory.inference.DTYPES16": "vramcalc.plans.DTYPES16",
    "vramcalc.memory.inference.MERGE_ON": "vramcalc.plans.MERGE_ON",
    "vramcalc.memory.inference.MERGE_BASES": "vramcalc.plans.MERGE_BASES",
    "vramcalc.memory.inference.InferPlan": "vramcalc.plans.InferPlan",
    "vramcalc.memory.inference.MergePlan": "vramcalc.plans.MergePlan",
    "vramcalc.memory.inference.kv_token_bytes": "vramcalc.memory.program.kv_cache.kv_token_bytes",
    "vramcalc.memory.inference._cached_len": "vramcalc.memory.program.kv_cache.cached_len",
    "vramcalc.memory.inference.CUBLAS_WORKSPACE_INFER":
        "vramcalc.memory.program.kv_cache.CUBLAS_WORKSPACE_INFER",
    # the c10 allocator constants, defined once (memory/allocator/replay.py); units.py
    "vramcalc.memory.inference.MiB": "vramcalc.units.MiB",
    "vramcalc.memory.inference.SMALL_SIZE": "vramcalc.memory.allocator.replay.SMALL_SIZE",
    "vramcalc.memory.inference.SMALL_BUFFER": "vramcalc.memory.allocator.replay.SMALL_BUFFER",
    "vramcalc.memory.inference.LARGE_BUFFER": "vramcalc.memory.allocator.replay.LARGE_BUFFER",
    "vramcalc.memory.inference.MIN_LARGE_ALLOC": "vramcalc.memory.allocator.replay.MIN_LARGE_ALLOC",
    "vramcalc.memory.inference.ROUND_LARGE": "vramcalc.memory.allocator.replay.ROUND_LARGE",
}

# test files laid out like the package (paths in docs, comments and .ci/run)
TESTS_MOVED: dict[str, str] = {
    "tests/test_allocator_replay.py": "tests/memory/allocator/test_allocator_replay.py",
    "tests/test_bad_inputs.py": "tests/commands/test_bad_inputs.py",
    "tests/test_calibrate.py": "tests/calibrate/test_calibrate.py",
    "tests/test_calibrate_multi.py": "tests/calibrate/test_calibrate_multi.py",
    "tests/test_check.py": "tests/commands/test_check.py",
    "tests/test_cli_property.py": "tests/commands/test_cli_property.py",
    "tests/test_comparison.py": "tests/sizing/test_comparison.py",
    "tests/test_corrections_applied.py": "tests/corrections/test_corrections_applied.py",
    "tests/test_estimate.py": "tests/memory/test_estimate.py",
    "tests/test_gpus.py": "tests/hardware/test_gpus.py",
    "tests/test_harness.py": "tests/calibrate/test_harness.py",
    "tests/test_hf_config.py": "tests/models/test_hf_config.py",
    "tests/test_hub.py": "tests/models/test_hub.py",
    "tests/test_inference.py": "tests/memory/test_inference.py",
    "tests/test_inference_program.py": "tests/memory/program/test_inference_program.py",
    "tests/test_input_rules.py": "tests/commands/test_input_rules.py",
    "tests/test_int8_outliers.py": "tests/memory/test_int8_outliers.py",
    "tests/test_load_requests.py": "tests/memory/program/test_load_requests.py",
    "tests/test_monotone.py": "tests/memory/test_monotone.py",
    "tests/test_multi_gpu.py": "tests/memory/test_multi_gpu.py",
    "tests/test_plan_cli.py": "tests/commands/test_plan_cli.py",
    "tests/test_replay_engines.py": "tests/memory/allocator/test_replay_engines.py",
    "tests/test_saved_activations.py": "tests/memory/test_saved_activations.py",
    "tests/test_specs.py": "tests/models/test_specs.py",
    "tests/test_static_bytes.py": "tests/memory/test_static_bytes.py",
    "tests/test_step_requests.py": "tests/memory/program/test_step_requests.py",
    "tests/test_step_templates.py": "tests/memory/program/test_step_templates.py",
    "tests/test_step_time.py": "tests/timing/test_step_time.py",
    "tests/test_sweep.py": "tests/commands/test_sweep.py",
    "tests/test_time_harness.py": "tests/calibrate/test_time_harness.py",
    "tests/test_verdict.py": "tests/sizing/test_verdict.py",
}

TEXT_SUFFIXES = {".py", ".pyi", ".md", ".rst", ".txt", ".toml", ".cfg", ".ini", ".sh", ".c",
                 ".yaml", ".js", ".html"}
DEFAULT_PATHS = ["src", "tests", "bench", "calibration", "docs", "tools", "README.md",
                 "setup.py", "pyproject.toml", ".ci"]
SKIP_DIRS = {".git", "__pycache__", ".venv", ".venv-test", "build", "dist", ".dev", ".whl",
             "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

RENAMED = {**MOVED, **SYMBOLS_MOVED}
NEW = set(RENAMED.values())
KNOWN = set(RENAMED) | NEW
IMPORTED = re.compile(r"[ \t]+import[ \t]+\(?\s*(\w+)")
DOTTED = re.compile(r"(?<![\w.\-/])vramcalc(?:\.\w+)+")
PATH = re.compile(r"(?<![\w.\-])vramcalc((?:/\w+)+)\.(pyi|py|c)\b")
TEST_PATH = re.compile(r"(?<![\w/.\-])tests/test_\w+\.py")
# `from vramcalc[.pkg] import a, b as c` on one line, or parenthesized over several
FROM_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)from (?P<pkg>vramcalc(?:\.\w+)*) import "
    r"(?:\((?P<paren>[^)]*)\)|(?P<line>[^\n#(]*?))(?P<tail>[ \t]*(?:#[^\n]*)?)$",
    re.MULTILINE)


def rename(dotted: str) -> str:
    """The new name of a dotted name (module, or module.attribute...), by its longest prefix
    that is a known old or new name; unchanged when that prefix is new or there is none.
    Repeated, so that a module move then a name move out of it both apply."""
    for _ in range(4):
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            prefix = ".".join(parts[:k])
            if prefix in KNOWN:
                break
        else:
            return dotted
        if prefix not in RENAMED or prefix in NEW:
            return dotted
        dotted = ".".join([RENAMED[prefix], *parts[k:]])
    return dotted


def _from_import(m: re.Match[str]) -> str:
    pkg, indent = m["pkg"], m["indent"]
    body = m["paren"] if m["paren"] is not None else m["line"]
    tail = m["tail"]
    comments = re.findall(r"#[^\n]*", body)  # a comment after `import (` is kept
    if comments and not tail.strip():
        tail = "  " + comments[0]
    body = re.sub(r"#[^\n]*", "", body)
    names = [n.strip() for n in body.replace("\n", " ").split(",") if n.strip()]
    kept: list[str] = []
    moved: list[str] = []
    for item in names:
        name, _, alias = (p.strip() for p in item.partition(" as "))
        full = f"{pkg}.{name}"
        if rename(full) == full:
            kept.append(item)
            continue
        new_pkg, _, new_name = rename(full).rpartition(".")
        bound = alias or name
        suffix = "" if bound == new_name else f" as {bound}"
        moved.append(f"{indent}from {new_pkg} import {new_name}{suffix}")
    if not moved:
        return m.group(0)
    lines = []
    if kept:
        lines.append(f"{indent}from {pkg} import {', '.join(kept)}{tail}")
    elif tail.strip():
        moved[0] += tail
    return "\n".join(lines + moved)


def _dotted(m: re.Match[str]) -> str:
    name = m.group(0)
    # `from vramcalc.corrections import factors`: a new module imported from its package,
    # whose name is also an old module's
    after = IMPORTED.match(m.string, m.end())
    if after and f"{name}.{after[1]}" in NEW:
        return name
    return rename(name)


def rewrite(text: str) -> str:
    # dotted names first: the package of a `from P import ...` is then already new, and the
    # statement is split only where it imports a moved module by name (`from vramcalc
    # import specs`)
    text = DOTTED.sub(_dotted, text)
    text = FROM_IMPORT.sub(_from_import, text)

    def path(m: re.Match[str]) -> str:
        module = "vramcalc" + m[1].replace("/", ".")
        new = rename(module)
        return m.group(0) if new == module else new.replace(".", "/") + "." + m[2]

    text = PATH.sub(path, text)
    return TEST_PATH.sub(lambda m: TESTS_MOVED.get(m.group(0), m.group(0)), text)


def files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for root in paths:
        if root.is_file():
            out.append(root)
            continue
        for p in sorted(root.rglob("*")):
            if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.parts):
                continue
            if p.is_file() and (p.suffix in TEXT_SUFFIXES or (p.suffix == "" and
                                                             root.name == ".ci")):
                out.append(p)
    # this file and its test hold the old names on purpose
    keep = {Path(__file__).resolve(), Path(__file__).resolve().parents[1] / "tests" /
            "test_regroup_imports.py"}
    return [p for p in out if p.resolve() not in keep]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--check", action="store_true", help="list what would change; exit 1 if any")
    args = ap.parse_args(argv)
    paths = args.paths or [Path(p) for p in DEFAULT_PATHS if Path(p).exists()]
    changed = []
    for p in files(paths):
        try:
            old = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = rewrite(old)
        if new != old:
            changed.append(p)
            if not args.check:
                p.write_text(new, encoding="utf-8")
    for p in changed:
        print(p)
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
