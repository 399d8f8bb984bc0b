"""`from vramcalc.integrations import VramcalcCallback`: the preflight inside a Trainer run.

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=lora)
    trainer.add_callback(VramcalcCallback(strict=True))   # before the first step
    trainer.train()

At `on_train_begin` it calls `vramcalc.preflight` with the trainer's model and arguments
(the model's config, quantization and LoRA adapters; the arguments' batch, max_length,
gradient checkpointing and optimizer), logs the summary, and with `strict=True` raises
`DoesNotFitError` (a VramcalcError, exit code 3) with the suggestions when it will not fit.

Why an exception and not `control.should_training_stop`: transformers' Trainer reads that
flag after a step ends (`Trainer._inner_training_loop` after `on_step_end`), so the first
step, the one that would run out of memory, would still run. An exception from
`on_train_begin` stops `trainer.train()` before it.

transformers is imported only when the class is first used: `VramcalcCallback` is made on
first attribute access by the module's `__getattr__` (PEP 562), subclassing
`transformers.TrainerCallback` then, so `import vramcalc.integrations` loads no torch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vramcalc.preflight_check import PreflightResult

__all__ = ["VramcalcCallback"]  # noqa: F822 (made on first use by __getattr__ below)

logger = logging.getLogger("vramcalc")


class _PreflightCheck:
    """What VramcalcCallback does, apart from the transformers base class it subclasses."""

    def __init__(
        self,
        model_or_id: Any = None,
        *,
        peft_config: Any = None,
        quantization_config: Any = None,
        max_seq_len: int | None = None,
        gpus: Sequence[Any] | None = None,
        strict: bool = False,
        margin_gib: float | None = None,
        quiet: bool = False,
    ) -> None:
        """`model_or_id` None: the trainer's model. `gpus` None: this machine's GPUs
        (NVML); without one the check is skipped with a log line, never an error.
        `strict`: raise DoesNotFitError when it does not fit. `quiet`: log to the
        "vramcalc" logger only, not also to stderr."""
        self.model_or_id = model_or_id
        self.peft_config = peft_config
        self.quantization_config = quantization_config
        self.max_seq_len = max_seq_len
        self.gpus = gpus
        self.strict = strict
        self.margin_gib = margin_gib
        self.quiet = quiet
        self.result: PreflightResult | None = None

    def _say(self, text: str, level: int = logging.INFO) -> None:
        logger.log(level, text)
        if not self.quiet:
            print(text, file=sys.stderr)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> Any:
        from vramcalc.errors import NoGpuError
        from vramcalc.preflight_check import DoesNotFitError, preflight
        from vramcalc.sizing.verdict import DEFAULT_MARGIN_GIB

        target = self.model_or_id if self.model_or_id is not None else model
        if target is None:
            self._say("vramcalc preflight: no model given and the trainer passed none; "
                      "skipped", logging.WARNING)
            return control
        margin = DEFAULT_MARGIN_GIB if self.margin_gib is None else self.margin_gib
        try:
            self.result = preflight(target, args, self.peft_config, self.quantization_config,
                                    self.max_seq_len, self.gpus, margin_gib=margin)
        except NoGpuError as err:
            self._say(f"vramcalc preflight: skipped, no GPU to check against ({err}); pass "
                      "gpus=[...] to check a GPU by name", logging.WARNING)
            return control
        fits = self.result.fits
        self._say(self.result.summary(), logging.INFO if fits else logging.WARNING)
        if self.strict and not fits:
            raise DoesNotFitError(self.result)
        return control


def _make_callback() -> type:
    from transformers import TrainerCallback

    class VramcalcCallback(_PreflightCheck, TrainerCallback):  # type: ignore[misc]
        """A transformers / TRL TrainerCallback: vramcalc.preflight at on_train_begin."""

    VramcalcCallback.__module__ = __name__
    return VramcalcCallback


def __getattr__(name: str) -> Any:
    if name == "VramcalcCallback":
        cls = _make_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
