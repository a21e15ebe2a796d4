"""Everything is declared in setup.cfg; this only adds the hparams package (mapped from the top-level hparams/
folder by setup.cfg's package_dir) to the found ones, which setup.cfg's ``packages = find:`` cannot express."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["smedit_plugin", "smedit_plugin.*"]) + ["smedit_plugin.hparams_files"])
