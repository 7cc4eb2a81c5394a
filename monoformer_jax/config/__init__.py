"""The config: its schema (the one home of every field), value checks, config files.

schema.py   the sections, their fields, defaults and own checks; base(), complete()
fields.py   value checks shared by config fields, flags and keyword arguments
files.py    `configs/{name}.py[:variant]` as a ConfigDict, for code without a flag
"""

from monoformer_jax.config.files import CONFIGS_DIR, config_file
from monoformer_jax.config.schema import base, complete

__all__ = ["CONFIGS_DIR", "base", "complete", "config_file"]
