"""The two registries: every dataset source and every evaluator is made by its
name from its one line, says what it needs, and generic code never imports the
digits demo."""

import ast
import pathlib

import pytest

from monoformer_jax.config import config_file
from monoformer_jax.data import datasets
from monoformer_jax.data.sources import DataSource
from monoformer_jax.errors import ConfigError
from monoformer_jax.eval import registry

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "monoformer_jax"


@pytest.mark.parametrize("name", list(datasets.SOURCES))
def test_each_source_is_made_by_its_name(name):
  source = datasets.source(name)
  assert isinstance(source, DataSource) and source.name == name
  if source.mixable:  # it writes a folder of its own records
    features = source.features(latent_shape=(4, 4, 4), flip=True)
    assert features and all(isinstance(k, str) for k in features)


def test_unknown_sources_and_metrics_name_the_known_ones():
  with pytest.raises(ConfigError, match="data.name='nope'.*'digits', 'imagenet'"):
    datasets.source("nope")
  with pytest.raises(ConfigError, match="unknown metric 'nope'.*'fid'"):
    registry.evaluator_class("nope")


def test_each_metric_has_one_evaluator_class_that_says_what_it_needs():
  for module, names in registry.FAMILIES.items():
    for name in names:
      cls = registry.evaluator_class(name)
      assert issubclass(cls, registry.Evaluator) and cls.__module__ == module
      assert cls.scores in ("samples", "model")
  assert registry.sample_metrics(registry.METRICS) == (
    "fid",
    "sfid",
    "is",
    "precision_recall",
    "digits",
  )
  groups = registry.families(["fid", "digits", "is", "reading"])
  assert [names for names in groups.values()] == [("fid", "is"), ("digits",), ("reading",)]


def test_training_metrics_are_checked_by_what_their_evaluators_say():
  config = config_file("digits")
  registry.check_training_metrics(config, "evals.metrics")
  assert registry.end_of_run_metrics(config) == ("digits", "reading", "interleaved", "editing")
  tiny = config_file("digits:tiny")  # no vision encoder, no interleaved or edit examples
  assert registry.end_of_run_metrics(tiny) == ("digits",)
  for metrics, error in (
    (("commonsense",), "does not run inside training"),
    (("reading",), "needs a model that reads images"),
    (("fid",), r"need --config.evals.inception"),
  ):
    tiny.evals.metrics = metrics
    with pytest.raises(ConfigError, match=error):
      registry.check_training_metrics(tiny, "evals.metrics")
  imagenet = config_file("imagenet256:tiny")
  imagenet.sample.metrics = ("reading",)
  with pytest.raises(ConfigError, match="scores the digits model, but data.name='imagenet'"):
    registry.check_training_metrics(imagenet, "sample.metrics")


def test_generic_code_never_imports_the_digits_demo():
  """Only the registries name it, by module path; nothing outside
  monoformer_jax/digits/ imports it."""
  for path in PACKAGE.rglob("*.py"):
    if PACKAGE / "digits" in path.parents:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = (
        [a.name for a in node.names]
        if isinstance(node, ast.Import)
        else [f"{node.module}.{a.name}" for a in node.names]
        if isinstance(node, ast.ImportFrom)
        else []
      )
      assert not any(n.startswith("monoformer_jax.digits") for n in names), path
