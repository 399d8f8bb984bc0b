"""Package discovery; all metadata is in pyproject.toml.

pyproject.toml cannot combine `packages.find` with one extra package, so the list is
built here: every package found under src/ (vramcalc and its subpackages, so a new
subpackage ships without editing anything) plus vramcalc.model_specs, which
[tool.setuptools.package-dir] maps to the repo's top-level model_specs/ folder.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src", include=["vramcalc", "vramcalc.*"]), "vramcalc.model_specs"])
