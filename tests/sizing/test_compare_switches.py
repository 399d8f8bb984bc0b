"""compare's switch cells (comparison.switch_cells): each method's plan with each value of
--offload-activations and --batch-layout, the bytes `plan` gives for that option, host
memory included; a value the plan cannot take says why."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from vramcalc.cli import app

runner = CliRunner()
CASE = ["-m", "qwen2.5-0.5b", "--batch", "2", "--seq-len", "1024"]


def _json(*args: str) -> dict[str, Any]:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code in (0, 3), r.output
    return dict(json.loads(r.stdout))


@pytest.mark.replay
def test_switch_cells_are_plans_bytes() -> None:
    rows = {m["method"]: m for m in _json("compare", *CASE, "--switches")["methods"]}
    lora = rows["lora"]["switches"]
    assert list(lora) == ["offload_activations", "layout"]
    assert list(lora["offload_activations"]) == ["none", "checkpoints", "all"]
    assert list(lora["layout"]) == ["padded", "packed", "padding-free"]
    assert lora["offload_activations"]["none"]["required_device_bytes"] == \
        rows["lora"]["required_device_bytes"]
    for field, flag in (("offload_activations", "--offload-activations"),
                        ("layout", "--batch-layout")):
        for value, cell in lora[field].items():
            plan = _json("plan", *CASE, "--method", "lora", flag, value)
            assert cell["required_device_bytes"] == plan["required_device_bytes"], value
            assert cell["host_bytes"] == plan.get("host_bytes", 0), value
    # offloading takes host memory and lowers the device's need
    off = lora["offload_activations"]
    assert off["all"]["host_bytes"] > off["checkpoints"]["host_bytes"] > 0
    assert off["all"]["peak_allocated_bytes"] < off["none"]["peak_allocated_bytes"]


def test_checkpoint_offloading_needs_checkpointing() -> None:
    rows = _json("compare", *CASE, "--switches", "--no-gradient-checkpointing")["methods"]
    cell = rows[0]["switches"]["offload_activations"]["checkpoints"]
    assert cell["required_device_bytes"] is None
    assert "needs gradient checkpointing" in cell["error"]


def test_padding_free_cell_keeps_the_real_tokens() -> None:
    """With --tokens-per-step (padding-free) the padded cell is full rows: more memory."""
    rows = _json("compare", *CASE, "--switches", "--batch-layout", "padding-free",
                 "--tokens-per-step", "600")["methods"]
    layout = rows[0]["switches"]["layout"]
    assert layout["padded"]["required_device_bytes"] > \
        layout["padding-free"]["required_device_bytes"]


# ---- check offers padding-free batches where --lengths shows padding ------------------------

def _lengths(tmp_path: Any, values: list[int]) -> str:
    f = tmp_path / "lengths.txt"
    f.write_text("\n".join(map(str, values)) + "\n")
    return str(f)


@pytest.mark.replay
def test_check_offers_padding_free_with_plans_bytes(tmp_path: Any) -> None:
    """Two long sequences among short ones: the padded worst step is 8 rows of the
    longest, the padding-free one the 8 longest together; check offers it with the bytes
    `plan --lengths F --batch-layout padding-free` gives, among the cheapest."""
    f = _lengths(tmp_path, [4000, 3000] + [500, 300, 800, 200] * 50)
    case = ["-m", "llama-3.1-8b", "--batch", "8", "--seq-len", "4096", "--lengths", f]
    free = _json("plan", *case, "--batch-layout", "padding-free")["required_device_bytes"]
    padded = _json("plan", *case)["required_device_bytes"]
    assert free < padded
    memory = (free + 2**30) / 2**30 + 3  # room for it, not for the padded step
    assert padded > memory * 2**30
    out = _json("check", *case, "--gpu-memory", f"{memory:.2f}")
    (s,) = [s for s in out["suggestions"] if s["kind"] == "layout"]
    assert s["required_device_bytes"] == free
    assert s["changes"] == {"layout": "padding-free", "seq_len": 4096,
                            "tokens_per_step": 4000 + 3000 + 800 * 6}
    assert s["cost_rank"] == 1 and "flash_attention_2" in s["cost"]


def test_no_padding_free_offer_without_padding(tmp_path: Any) -> None:
    """Every row of the worst step is as long as the longest: nothing to drop."""
    f = _lengths(tmp_path, [1000] * 20)
    out = _json("check", "-m", "llama-3.1-8b", "--batch", "8", "--seq-len", "4096",
                "--lengths", f, "--gpu-memory", "20")
    assert not [s for s in out["suggestions"] if s["kind"] == "layout"]
