"""Package discovery and the catalog index; all metadata is in pyproject.toml.

pyproject.toml cannot combine `packages.find` with one extra package, so the list is
built here: every package found under src/ (vramcalc and its subpackages, so a new
subpackage ships without editing anything) plus vramcalc.model_specs, which
[tool.setuptools.package-dir] maps to the repo's top-level model_specs/ folder.

The build step also rewrites vramcalc/model_specs/_index.json and vramcalc/data/_index.json,
the shipped YAML files parsed once (src/vramcalc/models/catalog_index.py; the repo commits
them too): a cold `vramcalc plan` or `check` then needs no PyYAML.

`vramcalc.memory.allocator._replay` (src/vramcalc/memory/allocator/_replay.c) is the
compiled replay of an estimate's request program. It is optional: where no C compiler is found or the build fails, the
install goes on without it and `vramcalc.memory.allocator.replay` runs its pure-Python replay,
which gives the same bytes (`vramcalc --version` says which one runs).
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_catalog_index(build_py):
    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location(
            "catalog_index", ROOT / "src" / "vramcalc" / "models" / "catalog_index.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for source, package in ((ROOT / "model_specs", "model_specs"),
                                (ROOT / "src" / "vramcalc" / "data", "data")):
            out_dir = Path(self.build_lib) / "vramcalc" / package
            out_dir.mkdir(parents=True, exist_ok=True)
            module.write_index(source, out_dir)


setup(
    packages=[*find_packages("src", include=["vramcalc", "vramcalc.*"]), "vramcalc.model_specs"],
    cmdclass={"build_py": build_py_with_catalog_index},
    ext_modules=[Extension("vramcalc.memory.allocator._replay", ["src/vramcalc/memory/allocator/_replay.c"], optional=True)],
)
