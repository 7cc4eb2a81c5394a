"""Checks a conversion against numbers the official PyTorch code produced.

A fixture folder (the format of tests/fixtures/official_tiny/) holds
`weights.safetensors` + `config.json` in the official layout and `io.npz`: the
reference's inputs, in our packed layout too (tokens, segment_ids, image_ids,
positions), and its outputs. The weights go through the converter, the model
runs in float32 with XLA attention, and every stored output is compared where
segment_ids != 0 (the reference's padding queries attend differently; their
outputs are discarded anyway). Errors: max |ours - ref| and that over max |ref|.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monoformer_jax.config.schema import CONDITIONING_TOKEN_MODE
from monoformer_jax.convert import official
from monoformer_jax.layout import Row, cond_columns_of, image_slots, tokens_per_image
from monoformer_jax.model.build import abstract_model


@dataclasses.dataclass
class Comparison:
  name: str
  max_abs: float
  max_rel: float  # max_abs / max |reference|
  ok: bool  # |ours - ref| <= tol + tol * |ref| everywhere (allclose)


def _compare(name, ours, ref, tol) -> Comparison:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f"{name}: ours has shape {ours.shape}, the reference {ref.shape}")
  diff = np.abs(ours - ref)
  max_abs = float(diff.max()) if diff.size else 0.0
  scale = float(np.abs(ref).max()) if ref.size else 0.0
  ok = bool(np.all(diff <= tol + tol * np.abs(ref)))
  return Comparison(name, max_abs, max_abs / scale if scale else max_abs, ok)


def fixture_config(base_config=None):
  """The base config for verification: float32 compute, XLA attention, no remat."""
  config = official.default_config() if base_config is None else base_config
  return official.with_model_fields(
    config, dict(dtype="float32", attention_impl="xla", remat=False)
  )


def fixture_row(io, tokens_per_image: int, cond_token: bool = False) -> Row:
  """The fixture's rows (our packed layout, one image slot per row) as the
  model reads them; with `cond_token` (add_before_image_tokens) each image's
  timestep token is the column before it (where the fixture's tokens hold -1)."""
  columns, valid = image_slots(io["image_ids"], 1, tokens_per_image)
  cond = cond_columns_of(columns, valid, cond_token, io["tokens"].shape[1])
  tokens = np.where(io["tokens"] < 0, 0, io["tokens"])  # replaced by the model anyway
  return Row(
    jnp.asarray(tokens),
    *(jnp.asarray(io[k]) for k in ("segment_ids", "image_ids", "positions")),
    jnp.asarray(columns),
    jnp.asarray(valid),
    jnp.asarray(cond),
  )


def _run_model(graphdef, params, row, latents, t):
  """Every output the fixtures store, from one jitted pass (eager is slower on CPU)."""
  model = nnx.merge(graphdef, params)
  x0, t_emb = model.embed(row, latents, t)
  final, layer_inputs = model.decoder(
    x0, row.positions, row.segment_ids, row.image_ids, return_layer_inputs=True
  )
  logits, out = model(row, latents, t)
  # The reference's c_embeds: adaLN_module(t_emb), or the timestep token t_projector(t_emb).
  c_emb = (
    model.timestep_tokens(t_emb) if model.cond_token else model.adaln_module(jax.nn.silu(t_emb))
  )
  return dict(
    t_emb=t_emb, c_emb=c_emb, layer_inputs=layer_inputs, final=final, logits=logits, out=out
  )


def verify_official(fixture: str, tolerance: float = 1e-4, base_config=None) -> list[Comparison]:
  """Our outputs vs the fixture's, through the converter: one Comparison each."""
  params, config = official.load_official(fixture, fixture_config(base_config))
  graphdef, _, _ = abstract_model(config.model)
  io = np.load(os.path.join(fixture, "io.npz"))
  row = fixture_row(
    io, tokens_per_image(config.model), config.model.conditioning == CONDITIONING_TOKEN_MODE
  )
  latents = jnp.asarray(io["x_t"].transpose(0, 2, 3, 1)[:, None])  # [B, M=1, h, w, C]
  t = jnp.asarray(io["t"][:, None].astype(np.int32))
  ours = jax.device_get(jax.jit(_run_model, static_argnums=0)(graphdef, params, row, latents, t))
  real = io["segment_ids"] != 0
  c_name = (
    "c_embeds (t_projector)"
    if config.model.conditioning == CONDITIONING_TOKEN_MODE
    else "c_embeds (adaLN)"
  )
  results = [
    _compare("t_embeds", ours["t_emb"][:, 0], io["t_embeds"], tolerance),
    _compare(c_name, ours["c_emb"][:, 0], io["c_embeds"], tolerance),
  ]
  for i in range(config.model.num_layers):
    results.append(
      _compare(
        f"layer_inputs[{i}]", ours["layer_inputs"][i][real], io["layer_inputs"][i][real], tolerance
      )
    )
  results.append(_compare("final_hidden", ours["final"][real], io["final_hidden"][real], tolerance))
  results.append(_compare("logits", ours["logits"][real], io["logits"][real], tolerance))
  results.append(
    _compare(
      "x_out (diffusion)",
      ours["out"][io["x_indices"], 0],
      io["x_out"].transpose(0, 2, 3, 1),
      tolerance,
    )
  )
  return results


def report(results: list[Comparison], tolerance: float) -> str:
  lines = [f"{'output':<24} {'max abs err':>12} {'max rel err':>12}  (tolerance {tolerance:g})"]
  for r in results:
    lines.append(
      f"{r.name:<24} {r.max_abs:>12.3e} {r.max_rel:>12.3e}  {'ok' if r.ok else 'ABOVE TOLERANCE'}"
    )
  return "\n".join(lines)
