"""A user's own calibration sets the host factor of the time model (issue 30).

The host time per operator differs between machines with the same cards and packages
(0.75-1.75x over five H100 SXM hosts, docs/time-model.md "Pre-registered time holdout 5"),
and nothing the time model can read on a machine it has not timed says which. A machine
that has run `vramcalc calibrate run` has: every point it measured records its step time
(`calibrate/run.py measure_point`: `step_seconds`, the median of the synchronized steps
after the first) in DATA/runs/*.json (`calibrate/store.py`). Here:

- the timed points of DATA/runs/*.json whose card is the GPU asked about (its NVML name
  and memory matched to the catalog, `hardware.catalog.match_detected`) are read, each
  with the step the time model makes of it (`step_time.train_work`);
- the host factor `h` is the one that minimizes the median |log(pred(h) / measured)| over
  those points, where pred(h) is `step_time.step_at_host`: the model's own step at `h`
  times the reference host's operator costs (its own split of host and GPU time; the GPU's
  efficiencies stay what `gpu_speed` gives). Searched on a log grid of 0.1-10 (5 % steps)
  with each point's own root (pred(h) = measured, by bisection), then refined around the
  best in 0.5 % and 0.05 % steps; of equally good factors the one nearest 1 wins (a
  GPU-bound point says nothing of the host); rounded to 0.001;
- `timing/cost.py train_time` times every training plan of `plan`, `check`, `compare`,
  `fit` and the API on that GPU with it (`time_basis` "calibrated", `host_factor`,
  `time_calibration` saying from how many steps and which files); `--no-calibration`
  (calibration=False) gives the shipped host constants.

Read-only: nothing is written. A run file that cannot be read or is not a calibration
run is one warning line on stderr (`calibrate/store.py run_from_text`) and is left out;
a folder that cannot be listed, one line and no factor. No torch.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from vramcalc.timing.step_time import GpuSpeed, StepTime, StepWork, step_at_host

if TYPE_CHECKING:
    from vramcalc.hardware.catalog import GpuModel
    from vramcalc.models.spec import ModelSpec

H_MIN = 0.1  # the search's bounds: ten times faster or slower than the reference host
H_MAX = 10.0
GRID_STEP = 0.05  # log-grid step (5 %)
REFINE = ((0.005, 10), (0.0005, 10))  # then around the best: 10 steps of 0.5 % each way,
# then 10 of 0.05 %
DECIMALS = 3  # the factor used and reported
# calibrate/store.py RUNS_DIR, not imported: without run files `plan`, `compare` and `fit`
# load nothing of vramcalc.calibrate (tests/test_light_imports.py)
RUNS_DIR = "runs"
_CUT = re.compile(r"^(?P<base>.+)@(?P<layers>\d+)L$")  # models.spec.depth_cut's names


class TimedStep(NamedTuple):
    """One measured step of a calibration run, with the work the time model makes of it."""

    work: StepWork
    step_seconds: float
    source: Path  # the run file


class Timed(NamedTuple):
    """Every timed step under DATA/runs by catalog GPU name, and what was left out."""

    by_gpu: dict[str, tuple[TimedStep, ...]]
    unknown_models: dict[str, int]  # catalog GPU name -> timed steps left out (a model
    # outside the catalog, or a plan its catalog spec refuses)


class HostFit(NamedTuple):
    """The host factor fitted on one GPU's timed steps."""

    factor: float
    steps: int
    host_bound: int  # of them, steps whose host time exceeds their GPU time at `factor`
    sources: tuple[Path, ...]
    median_error_reference: float  # median |log(pred/meas)| at host factor 1
    median_error_fitted: float  # at `factor`
    left_out: int = 0  # timed steps of models outside the catalog (Timed.unknown_models)

    def note(self) -> str:
        """'host factor 1.42 from 6 timed steps on this machine, DATA/runs/h100-...json'."""
        where = (str(self.sources[0]) if len(self.sources) == 1
                 else f"{len(self.sources)} runs in {self.sources[0].parent}")
        out = (f"host factor {self.factor:.2f} from {self.steps} timed step"
               f"{'s' if self.steps != 1 else ''} on this machine ({self.host_bound} "
               f"host-bound), {where}")
        if self.left_out:
            out += f"; {self.left_out} timed steps of models outside the catalog left out"
        return out


def runs_folder() -> Path:
    """DATA/runs: where `vramcalc calibrate run` saves its points (the user data folder,
    corrections.factors.user_data_dir, or $VRAMCALC_DATA_DIR)."""
    from vramcalc.corrections.factors import user_data_dir

    return user_data_dir() / RUNS_DIR


def _listing(folder: Path) -> tuple[tuple[str, int, int], ...] | None:
    """(name, mtime_ns, size) of each *.json entry of `folder`: the cache key of what is
    read from it; empty when there is no folder, None (after one line) when it cannot be
    listed."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if e.name.endswith(".json")]
            out = []
            for e in entries:
                try:
                    st = e.stat()
                except OSError:  # gone or unreachable: read_text says so
                    out.append((e.name, -1, -1))
                    continue
                out.append((e.name, st.st_mtime_ns, st.st_size))
    except (FileNotFoundError, NotADirectoryError):
        return ()
    except OSError as err:
        print(f"warning: cannot read {folder}: {err.strerror or err}; the time model's host "
              "factor is not calibrated", file=sys.stderr)
        return None
    return tuple(sorted(out))


def _spec_of(name: str) -> ModelSpec | None:
    """The catalog spec of a run point's model name (a depth cut `NAME@4L` too), or None:
    a model outside the catalog (a spec file, a hub id) is not looked up again here, since
    `plan` reads no file and fetches nothing for it."""
    from vramcalc.errors import VramcalcError
    from vramcalc.models.spec import depth_cut, get_spec

    cut = _CUT.match(name)
    try:
        if cut is not None:
            return depth_cut(get_spec(cut["base"]), int(cut["layers"]))
        return get_spec(name)
    except VramcalcError:
        return None


@functools.lru_cache(maxsize=4)
def _timed(folder: str, listing: tuple[tuple[str, int, int], ...]) -> Timed:
    """The timed steps of the run files `listing` names in `folder` (read once per
    process and listing)."""
    from vramcalc.calibrate.store import run_from_text
    from vramcalc.errors import CalibrationError, UnknownGpuError, VramcalcError
    from vramcalc.hardware.catalog import match_detected, resolve_gpu
    from vramcalc.timing.step_time import train_work
    from vramcalc.user_files import read_text

    by_gpu: dict[str, list[TimedStep]] = {}
    unknown: dict[str, int] = {}
    for name, _, _ in listing:
        path = Path(folder) / name
        try:
            text = read_text(path, str(path), CalibrationError)
        except CalibrationError as err:
            print(f"warning: skipping {err}", file=sys.stderr)
            continue
        run = run_from_text(text, path)
        if run is None:
            continue
        env = run.environment
        gpu = None
        if env.gpu_name:
            try:
                gpu = (match_detected(env.gpu_name, env.gpu_memory_bytes)
                       if env.gpu_memory_bytes else resolve_gpu(env.gpu_name))
            except UnknownGpuError:  # not in the catalog, or an NVML name two cards share
                gpu = None
        if gpu is None:
            continue
        for p in run.points:
            secs = p.measurement.get("step_seconds")
            if (p.error or p.oom or isinstance(secs, bool)
                    or not isinstance(secs, (int, float)) or not 0 < secs < math.inf):
                continue
            spec = _spec_of(p.model)
            try:
                if spec is None:
                    raise VramcalcError(p.model)
                work = train_work(spec, p.plan)
            except VramcalcError:  # not in the catalog, or a plan its spec refuses
                unknown[gpu.name] = unknown.get(gpu.name, 0) + 1
                continue
            by_gpu.setdefault(gpu.name, []).append(TimedStep(work, float(secs), path))
    return Timed({k: tuple(v) for k, v in by_gpu.items()}, unknown)


def _median(values: list[float]) -> float:
    """statistics.median, without importing statistics (~5 ms of a cold `plan`: it loads
    fractions, decimal and random)."""
    a = sorted(values)
    mid = len(a) // 2
    return a[mid] if len(a) % 2 else (a[mid - 1] + a[mid]) / 2


def fit_host_factor(points: Sequence[tuple[Callable[[float], float], float]]) -> float:
    """The host factor h minimizing the median |log(pred(h) / measured)| over `points`
    (pred: a step's seconds at host factor h, non-decreasing in h; measured seconds), in
    [H_MIN, H_MAX]; of equally good factors the nearest to 1 (module docstring)."""
    if not points:
        raise ValueError("no timed points")

    def objective(h: float) -> float:
        return _median([abs(math.log(pred(h) / meas)) for pred, meas in points])

    def key(h: float) -> tuple[float, float]:
        return (round(objective(h), 12), abs(math.log(h)))

    lo, hi = math.log(H_MIN), math.log(H_MAX)
    n = int(round((hi - lo) / GRID_STEP))
    candidates = [1.0] + [math.exp(lo + k * (hi - lo) / n) for k in range(n + 1)]
    for pred, meas in points:  # each point's own root, where it has one in the range
        a, b = lo, hi
        if not pred(math.exp(a)) < meas < pred(math.exp(b)):
            continue
        for _ in range(60):
            mid = (a + b) / 2
            a, b = (mid, b) if pred(math.exp(mid)) < meas else (a, mid)
        candidates.append(math.exp((a + b) / 2))
    best = min(candidates, key=key)
    for step, steps in REFINE:
        around = [best * math.exp(k * step) for k in range(-steps, steps + 1)]
        best = min([best, *(h for h in around if H_MIN <= h <= H_MAX)], key=key)
    return round(best, DECIMALS)


def _seconds(at: Callable[[float], StepTime]) -> Callable[[float], float]:
    return lambda h: at(h).step_seconds


def fit_steps(steps: Sequence[TimedStep], speed: GpuSpeed, left_out: int = 0) -> HostFit:
    """HostFit of `steps` timed on `speed` (its efficiencies; its host factor replaced)."""
    at = [(step_at_host(s.work, speed), s.step_seconds) for s in steps]
    points = [(_seconds(f), m) for f, m in at]
    h = fit_host_factor(points)

    def median_error(factor: float) -> float:
        return _median([abs(math.log(p(factor) / m)) for p, m in points])

    fitted = [f(h) for f, _ in at]
    return HostFit(factor=h, steps=len(steps),
                   host_bound=sum(1 for t in fitted if t.host_seconds > t.gpu_seconds),
                   sources=tuple(sorted({s.source for s in steps})),
                   median_error_reference=median_error(1.0),
                   median_error_fitted=median_error(h), left_out=left_out)


@functools.lru_cache(maxsize=16)
def _fit_for(folder: str, listing: tuple[tuple[str, int, int], ...], gpu_name: str,
             speed: GpuSpeed) -> HostFit | None:
    timed = _timed(folder, listing)
    steps = timed.by_gpu.get(gpu_name)
    if not steps:
        return None
    return fit_steps(steps, speed, timed.unknown_models.get(gpu_name, 0))


def host_fit(gpu: GpuModel, speed: GpuSpeed) -> HostFit | None:
    """The host factor fitted on this machine's timed steps of `gpu` (DATA/runs), or None
    when there are none."""
    folder = runs_folder()
    listing = _listing(folder)
    if not listing:
        return None
    return _fit_for(str(folder), listing, gpu.name, speed)


def calibrated(gpu: GpuModel, speed: GpuSpeed) -> tuple[GpuSpeed, HostFit | None]:
    """`speed` under this machine's host factor for `gpu` (basis "calibrated"), and the
    fit; `speed` itself and None when DATA/runs holds no timed step of `gpu`."""
    fit = host_fit(gpu, speed)
    if fit is None:
        return speed, None
    return speed._replace(host_factor=fit.factor, basis="calibrated"), fit
