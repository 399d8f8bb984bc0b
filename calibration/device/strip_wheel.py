"""Repack a wheel without some of its top-level folders, so a device call can carry it.

The device call's carry is limited (calibration/DEVICE.md); unsloth's wheel (2026.10.9,
28.6 MB) is mostly its `studio/` web app and `unsloth_cli/`, which `import unsloth` never
imports. This copies every other member, drops the removed ones from the wheel's RECORD
and drops `console_scripts` that point into a removed folder; pip does not check RECORD
hashes of the remaining files against anything but themselves, which are unchanged.

    python calibration/device/strip_wheel.py IN.whl OUT_DIR --drop studio --drop unsloth_cli
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path


def _points_into(line: str, folder: str) -> bool:
    """An entry point line `name = module:attr` whose module is in `folder`."""
    target = line.partition("=")[2].strip()
    return bool(target) and target.split(":")[0].replace(".", "/").startswith(folder.rstrip("/"))


def strip(src: Path, out_dir: Path, drop: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    prefixes = tuple(d.rstrip("/") + "/" for d in drop)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            name = info.filename
            if name.startswith(prefixes):
                continue
            data = zin.read(name)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                kept = [ln for ln in lines if not ln.startswith(prefixes)]
                data = ("\n".join(kept) + "\n").encode()
            elif name.endswith(".dist-info/entry_points.txt"):
                kept = [ln for ln in data.decode().splitlines()
                        if not any(_points_into(ln, d) for d in drop)]
                data = ("\n".join(kept) + "\n").encode()
            zout.writestr(info, data)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--drop", action="append", default=[], help="top-level folder to leave out")
    a = ap.parse_args()
    dst = strip(a.wheel, a.out_dir, a.drop)
    print(dst, dst.stat().st_size)


if __name__ == "__main__":
    main()
