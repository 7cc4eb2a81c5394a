"""validate.py's import, until monoformer_jax/checks.py asks eval/registry.py (issue 35).

Why a metric cannot score a model is its evaluator's (`Evaluator.problem`);
the embedded default's evaluators are in monoformer_jax/digits/evaluators.py.
"""

from monoformer_jax.eval import registry


def model_metric_problem(name: str, config) -> str | None:
  return registry.evaluator_class(name).problem(name, config)
