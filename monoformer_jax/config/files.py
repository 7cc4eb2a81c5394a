"""The repository's config files, `configs/{name}.py`, as ConfigDicts.

What `--config=configs/{name}.py[:variant]` gives the entry points, for code
that has no flag: conversions start from `imagenet256`, the tests from
`digits:tiny`, the benchmarks and the notebook from `digits`. The files ship
with a source checkout (the project is installed with `pip install -e .`), not
inside the package.
"""

import importlib.util
import pathlib

from monoformer_jax.config.schema import complete

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def config_file(name: str):
  """`configs/{name}.py`'s get_config(), completed and checked; "name:variant"
  calls get_config(variant), as `--config=configs/name.py:variant` does."""
  name, _, variant = name.partition(":")
  path = CONFIGS_DIR / f"{name}.py"
  if not path.exists():
    raise FileNotFoundError(
      f"no {path}: the configs come with a clone of the repository (install it with "
      f"`pip install -e .`), or pass --config=path/to/configs/{name}.py"
    )
  spec = importlib.util.spec_from_file_location(f"monoformer_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  return complete(config, f"configs/{name}.py")
