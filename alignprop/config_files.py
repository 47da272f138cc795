"""Config files as `--config FILE.py[:ARG]` reads them (ml_collections)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alignprop.errors import ConfigError


def load_config(spec: str | Path) -> Any:
    """`FILE.py[:ARG]` as `--config` reads it (ml_collections): import the file, call get_config([ARG])."""
    path, _, arg = str(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    if module_spec is None or not Path(path).is_file():
        raise ConfigError(f"--config {spec}: no such config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
