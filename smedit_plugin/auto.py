"""Importing this module registers every plugin method into the installed EasyEdit."""
from .registry import register

REPORT = register()
