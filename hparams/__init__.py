"""The shipped YAML hparams, installed as the package data ``smedit_plugin.hparams_files`` (see setup.cfg).

This file only makes the folder importable so that wheels and editable installs both find it through
``importlib.resources``; ``smedit hparams --export DIR`` copies the YAMLs alone.
"""
