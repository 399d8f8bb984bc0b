"""`plan` and `check` must never import torch, transformers, bitsandbytes, peft or pynvml
on their path: proven in a fresh interpreter (huggingface_hub's check_imports idea)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "bitsandbytes", "peft", "pynvml")


def _modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    return set(out.split(","))


def test_cli_import_is_light() -> None:
    loaded = _modules_after("import vramcalc.cli")
    assert not loaded & set(HEAVY)


def test_plan_command_imports_nothing_heavy() -> None:
    code = (
        "from typer.testing import CliRunner\n"
        "from vramcalc.cli import app\n"
        "r = CliRunner().invoke(app, ['plan', '--model', 'llama-7b', '--json',"
        " '--gpu-memory', '24', '--max', 'batch'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['plan', '--model', 'llama-7b'])\n"
        "assert r.exit_code == 0, r.output\n"
    )
    loaded = _modules_after(code)
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


CALIBRATE = ("vramcalc.calibrate", "vramcalc.commands.calibrate")


def _run_cli(*args: str) -> set[str]:
    """Modules loaded by a real `vramcalc ARGS` in a fresh interpreter (main(), exit 0)."""
    code = (
        "import sys\n"
        f"sys.argv = ['vramcalc', *{list(args)!r}]\n"
        "from vramcalc.cli import main\n"
        "try:\n"
        "    main(exit_now=False)\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print()\n"
    )
    return _modules_after(code)


def test_help_imports_no_command() -> None:
    loaded = _run_cli("--help")
    assert not loaded & set(HEAVY)
    assert not {m for m in loaded if m.startswith("vramcalc.commands.")}, loaded
    assert "vramcalc.memory.estimate" not in loaded and "vramcalc.models.spec" not in loaded


def test_plan_imports_neither_heavy_nor_calibrate() -> None:
    loaded = _run_cli("plan", "--model", "llama-7b")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert not loaded & set(CALIBRATE), loaded & set(CALIBRATE)
    assert "vramcalc.commands.check" not in loaded


def test_help_summaries_match_the_commands() -> None:
    from vramcalc.cli import COMMANDS, load_command

    for name, entry in COMMANDS.items():
        command = load_command(name)
        assert (command.help or "").strip().splitlines()[0] == entry.summary, name


def test_compare_and_fit_import_nothing_heavy() -> None:
    for args in (("compare", "--model", "llama-7b"), ("compare", "-m", "qwen2.5-0.5b", "--json"),
                 ("fit", "--gpu", "t4"), ("fit", "--gpu", "rtx-4090", "--json")):
        loaded = _run_cli(*args)
        assert not loaded & set(HEAVY), (args, loaded & set(HEAVY))
        assert not loaded & set(CALIBRATE), (args, loaded & set(CALIBRATE))


def test_parallel_choices_match_multi_gpu() -> None:
    """commands/parallel.py spells the multi-GPU choices so `plan` need not load multi_gpu."""
    from vramcalc.commands import parallel
    from vramcalc.memory import multi_gpu

    for name in ("STRATEGIES", "OFFLOADS", "SHARDING_STRATEGIES", "BALANCES", "QUANT_STORAGES"):
        assert getattr(parallel, name) == getattr(multi_gpu, name), name


def test_plan_without_gpus_skips_multi_gpu() -> None:
    loaded = _run_cli("plan", "--model", "llama-7b")
    assert "vramcalc.memory.multi_gpu" not in loaded


# Modules a cold `vramcalc plan --model NAME` has no use for (issue 9: it runs in loops).
NOT_ON_PLAN_PATH = (
    "vramcalc.memory.multi_gpu", "vramcalc.memory.inference", "vramcalc.calibrate",
    "vramcalc.memory.program.infer",  # the inference and merge programs (2.5 ms of imports)
    "vramcalc.models.hub", "vramcalc.models.hf_config", "vramcalc.hardware.catalog",
    "vramcalc.sizing.advice", "vramcalc.sizing.comparison",
    "vramcalc.training_config", "huggingface_hub", "platformdirs",
    "vramcalc.corrections.factors",  # no GPU named: corrections.selection decides
)
# vramcalc.api is on the path on purpose: every command is parse -> api -> render (issue 26
# Deliver 4); its pydantic types build on first use (defer_build), its results are
# NamedTuples (cheap to define). It stays free of rich and typer (test_api_loads_no_cli).


def test_plan_imports_only_what_it_uses() -> None:
    loaded = _run_cli("plan", "--model", "llama-7b")
    assert not loaded & set(NOT_ON_PLAN_PATH), loaded & set(NOT_ON_PLAN_PATH)


def test_plan_json_imports_no_rich_renderer() -> None:
    """--json needs the dict helpers of vramcalc.render, not rich's console or tables."""
    loaded = _run_cli("plan", "--model", "llama-7b", "--json")
    assert not {m for m in loaded if m.startswith("rich.")}, sorted(
        m for m in loaded if m.startswith("rich."))


def test_api_loads_no_cli() -> None:
    """The front door the commands call loads neither the CLI (typer, rich) nor torch."""
    loaded = _modules_after("import vramcalc.api")
    assert not {m for m in loaded if m.split(".")[0] in ("typer", "rich", "torch", "click")}


def _modules_in_env(code: str, env: dict[str, str]) -> set[str]:
    import os

    probe = code + "\nimport sys\nprint(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.strip().splitlines()[-1]
    return set(out.split(","))


def test_plan_reads_no_package_metadata() -> None:
    """cli._skip_plugin_loader: with every pydantic plugin off (main's default), building
    the validators does not import importlib.metadata (pydantic's plugin loader)."""
    loaded = _run_cli("plan", "--model", "llama-7b")
    assert "importlib.metadata" not in loaded
    assert "vramcalc.models.spec" in loaded  # a validator was built (ModelSpec, TrainPlan)


def test_pydantic_asks_its_plugin_loader_for_get_plugins_only() -> None:
    """What _skip_plugin_loader replaces: pydantic imports its plugin loader in one place,
    for `get_plugins` alone, and that function finds no plugin when all are off."""
    import re
    from pathlib import Path

    import pydantic

    root = Path(pydantic.__file__).parent
    users = {str(p.relative_to(root)): re.findall(r"^\s*from \._loader import (.+)$|"
                                                  r"^\s*(?:from|import) [\w.]*plugin\._loader",
                                                  p.read_text(encoding="utf-8"), re.M)
             for p in root.rglob("*.py")}
    users = {k: v for k, v in users.items() if v}
    assert users == {"plugin/_schema_validator.py": ["get_plugins"]}, users
    code = ("from pydantic.plugin._loader import get_plugins\n"
            "assert tuple(get_plugins()) == (), get_plugins()\n")
    for value in ("__all__", "1", "true"):
        loaded = _modules_in_env(code, {"PYDANTIC_DISABLE_PLUGINS": value})
        assert "pydantic.plugin._loader" in loaded


def test_a_users_plugin_setting_keeps_pydantic_loader() -> None:
    """PYDANTIC_DISABLE_PLUGINS naming some plugins: pydantic's own loader runs."""
    code = (
        "import sys\n"
        "sys.argv = ['vramcalc', 'plan', '--model', 'llama-7b']\n"
        "from vramcalc.cli import main\n"
        "try:\n"
        "    main(exit_now=False)\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert hasattr(sys.modules['pydantic.plugin._loader'], 'entry_points')\n"
        "print()\n"
    )
    loaded = _modules_in_env(code, {"PYDANTIC_DISABLE_PLUGINS": "some-plugin"})
    assert "importlib.metadata" in loaded


def test_shipped_yaml_comes_from_the_indexes() -> None:
    """plan, check and compare read the model catalog, gpus.yaml, gpu_speed.yaml and
    prices.yaml from their committed JSON indexes (models/catalog_index.py): no PyYAML."""
    for args in (("plan", "--model", "llama-7b"),
                 ("plan", "-m", "llama-7b", "--gpu", "h100-sxm", "--dataset-tokens", "1000000"),
                 ("check", "-m", "llama-7b", "--gpu", "rtx-4090"),
                 ("compare", "-m", "qwen2.5-0.5b")):
        loaded = _run_cli(*args)
        assert "vramcalc.hardware.catalog" in loaded or args[0] == "plan", args
        assert "yaml" not in loaded, args


def test_a_command_runs_with_the_collector_on_and_its_threshold() -> None:
    """cli.main: the cyclic collector waits while the command loads, then runs (every
    COMMAND_GC_THRESHOLD allocations) while the command does."""
    code = (
        "import gc, sys\n"
        "from vramcalc import cli\n"
        "sys.argv = ['vramcalc', 'plan', '--model', 'llama-7b']\n"
        "seen = []\n"
        "run = cli.LazyGroup.get_command\n"
        "def spy(self, ctx, name):\n"
        "    seen.append((gc.isenabled(), gc.get_threshold()[0]))\n"
        "    out = run(self, ctx, name)\n"
        "    seen.append((gc.isenabled(), gc.get_threshold()[0]))\n"
        "    return out\n"
        "cli.LazyGroup.get_command = spy\n"
        "try:\n"
        "    cli.main(exit_now=False)\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert seen[0] == (False, 700), seen\n"
        "assert seen[-1] == (True, cli.COMMAND_GC_THRESHOLD), seen\n"
        "import gc\n"
        "assert gc.collect() >= 0 and gc.isenabled()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_plan_reads_its_files_without_importlib_resources() -> None:
    """catalog_index.package_folder: a package on disk is read as a folder; the folder is
    the one importlib.resources gives."""
    from importlib import resources
    from pathlib import Path

    from vramcalc.models.catalog_index import package_folder

    for package in ("vramcalc", "vramcalc.data", "vramcalc.model_specs"):
        folder = package_folder(package)
        assert isinstance(folder, Path) and folder.is_dir()
        assert folder.resolve() == Path(str(resources.files(package))).resolve()
    loaded = _run_cli("plan", "--model", "llama-7b")
    assert "importlib.resources" not in loaded


def test_check_and_compare_load_no_emoji_table() -> None:
    """check and compare print with Console(emoji=False), as plan does: rich's emoji
    table (rich._emoji_codes) is never loaded."""
    for args in (("check", "-m", "llama-7b", "--gpu", "rtx-4090"),
                 ("compare", "-m", "qwen2.5-0.5b"), ("plan", "--model", "llama-7b")):
        loaded = _run_cli(*args)
        assert "rich.console" in loaded and "rich._emoji_codes" not in loaded, args


@pytest.mark.replay
def test_an_estimate_leaves_no_garbage_cycle() -> None:
    """Why cli.main may collect cycles rarely (COMMAND_GC_THRESHOLD): a full estimate, its
    step program replayed, leaves nothing for the cyclic collector to free."""
    import gc

    from vramcalc.memory.estimate import estimate
    from vramcalc.models.spec import get_spec
    from vramcalc.plans import TrainPlan

    spec = get_spec("llama-3.1-8b")
    estimate(spec, TrainPlan())  # first use: caches, validators
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for plan in (TrainPlan(batch_size=2), TrainPlan(method="lora", quant="none"),
                     TrainPlan(gradient_checkpointing=False, seq_len=1024)):
            estimate(spec, plan)
            assert gc.collect() == 0, plan
    finally:
        if was:
            gc.enable()
