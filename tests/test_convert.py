"""Weights in and out: official layout both ways, HF Llama, sharded builds, errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from helpers import config_file
from safetensors.numpy import load_file, save_file

from monoformer_jax.checkpoints import load_model, load_params, stored_weights
from monoformer_jax.convert import llama, official, verify
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.layout import Example, Row, RowSpec
from monoformer_jax.model.build import abstract_model, param_shardings
from monoformer_jax.parallel import sharding
from monoformer_jax.parallel.sharding import make_mesh
from monoformer_jax.safetensors_io import SafetensorsSource
from monoformer_jax.train.loop import initial_state, train_and_evaluate
from monoformer_jax.train.state import make_optimizer

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "tests" / "fixtures" / "tiny_llama"


@pytest.fixture(scope="module")
def base():
  return verify.fixture_config()


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _assert_same_official(dir_a, dir_b):
  """Same keys, dtypes, shapes and bytes (read with the safetensors library)."""
  read = lambda d: {
    k: v
    for f in sorted(pathlib.Path(d).glob("*.safetensors"))
    for k, v in load_file(str(f)).items()
  }
  a, b = read(dir_a), read(dir_b)
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype == np.float32 and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


# ------------------------------------------------------------ verify-official


def test_verify_official_flags_errors_above_tolerance():
  # (the shipped fixture passing verify_official is tests/test_model.py's first test)
  ok = verify._compare("x", np.array([1.0, 2.0]), np.array([1.0, 2.0001]), 1e-4)
  bad = verify._compare("x", np.array([1.0, 2.0]), np.array([1.0, 2.001]), 1e-4)
  assert ok.ok and not bad.ok and abs(bad.max_rel - 0.001 / 2.001) < 1e-9
  assert "ABOVE TOLERANCE" in verify.report([ok, bad], 1e-4)


@pytest.mark.slow
def test_verify_official_cli(fixture_dir):
  run = subprocess.run(
    [sys.executable, "-m", "monoformer_jax.convert", "verify-official", f"--fixture={fixture_dir}"],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert "logits" in run.stdout and "x_out" in run.stdout and "ABOVE" not in run.stdout


# ----------------------------------------------------------------- round trips


def test_round_trip_official_ours_official_is_bit_exact(fixture_dir, base, tmp_path):
  official.convert_official(str(fixture_dir), str(tmp_path / "ckpt"), base)
  official.convert_to_official(str(tmp_path / "ckpt"), str(tmp_path / "back"))
  assert sorted(os.listdir(tmp_path / "back")) == ["config.json", "model.safetensors"]
  _assert_same_official(tmp_path / "back", fixture_dir)
  hf = json.loads((tmp_path / "back" / "config.json").read_text())
  ref = json.loads((fixture_dir / "config.json").read_text())["_fixture"]
  for key, value in ref["fields_read_by_official_code"].items():
    if key != "_attn_implementation":  # chosen by transformers at load time
      assert hf[key] == value, key


def _sharded_official(src, dst, n):
  """The fixture's tensors split over n shards with an index json (safetensors' own writer)."""
  tensors = load_file(str(src / "weights.safetensors"))
  keys = sorted(tensors)
  weight_map = {}
  os.makedirs(dst, exist_ok=True)
  for i in range(n):
    name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    part = keys[i::n]
    save_file({k: tensors[k] for k in part}, str(dst / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(part, name))
  (dst / "model.safetensors.index.json").write_text(
    json.dumps(
      {
        "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
        "weight_map": weight_map,
      }
    )
  )
  shutil.copy(src / "config.json", dst / "config.json")
  return tensors


def test_round_trip_sharded_with_ema(fixture_dir, base, tmp_path):
  raw = _sharded_official(fixture_dir, tmp_path / "in", 3)
  ema = {k: (0.5 * v + 0.25).astype(np.float32) for k, v in raw.items()}
  os.makedirs(tmp_path / "in" / "ema")
  save_file(ema, str(tmp_path / "in" / "ema" / "model.safetensors"), metadata={"format": "pt"})
  shutil.copy(fixture_dir / "config.json", tmp_path / "in" / "ema" / "config.json")

  official.convert_official(str(tmp_path / "in"), str(tmp_path / "ckpt"), base)
  assert stored_weights(str(tmp_path / "ckpt")) == ["ema", "params"]
  ema_params, _, _ = load_params(str(tmp_path / "ckpt"), weights="ema")
  np.testing.assert_array_equal(
    np.asarray(ema_params["embed_tokens"]), ema["model.embed_tokens.weight"]
  )

  official.convert_to_official(
    str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_bytes=200_000
  )
  out = tmp_path / "out"
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
  assert set(index["weight_map"]) == set(raw)
  _assert_same_official(out, tmp_path / "in")
  _assert_same_official(out / "ema", tmp_path / "in" / "ema")
  assert (out / "ema" / "config.json").exists()


def test_cli_official_and_back(fixture_dir, tmp_path):
  from absl import flags
  from absl.testing import flagsaver

  from monoformer_jax.convert.__main__ import main

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  weights = fixture_dir / "weights.safetensors"  # a single file, config.json beside it
  with flagsaver.flagsaver(input=str(weights), output=str(tmp_path / "ckpt")):
    main(["convert", "official"])
  with flagsaver.flagsaver(input=str(tmp_path / "ckpt"), output=str(tmp_path / "back")):
    main(["convert", "to-official"])
  _assert_same_official(tmp_path / "back", fixture_dir)
  with pytest.raises(Exception, match="usage"):
    main(["convert", "sideways"])


# ------------------------------------------------------------------ sharding


def test_building_into_shards_on_a_mesh_gives_the_same_params(fixture_dir, base, tmp_path):
  mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
  single, _config = official.load_official(str(fixture_dir), base)
  sharded, _ = official.load_official(
    str(fixture_dir), base, shardings_fn=lambda c: param_shardings(c, mesh)
  )
  flat = traverse_util.flatten_dict(sharded)
  split = [
    k
    for k, v in flat.items()
    if len(v.sharding.device_set) == 8 and v.addressable_shards[0].data.shape != v.shape
  ]
  # embed over fsdp, heads/mlp/vocab over tensor: most of the model is split
  assert ("decoder", "layers", "attn", "wq") in split and ("lm_head",) in split
  chex.assert_trees_all_equal(single, sharded)
  # the CLI's --mesh path: convert into shards, save, read back on one device
  official.convert_official(str(fixture_dir), str(tmp_path / "ckpt"), base, mesh=mesh)
  chex.assert_trees_all_equal(single, load_params(str(tmp_path / "ckpt"), weights="raw")[0])


# --------------------------------------------------------------------- llama


def _text_logits(model, ids):
  """Logits of text-only packed rows (one example per row, no image slot)."""
  _b, length = ids.shape
  m = model.cfg
  spec = RowSpec(
    seq_len=length,
    max_images=0,
    image_shape=(m.image_size, m.image_size, m.in_channels),
    tokens_per_image=model.tokens_per_image,
    image_id=m.vocab_size - 3,
    pad_id=m.vocab_size - 4,
  )
  row = Row.of(pack_examples([Example(x) for x in ids], spec, one_per_row=True))
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, row: nnx.merge(graphdef, state)(row)[0])
  return run(state, row)


def test_llama_matches_transformers_logits(base, tmp_path):
  io = np.load(TINY_LLAMA / "io.npz")
  config = llama.convert_llama(str(TINY_LLAMA), str(tmp_path / "ckpt"), base, seed=3)
  assert config.model.vocab_size == 320 + 4 and config.model.rope_theta == 1000.0
  assert config.model.rms_norm_eps == 1e-6
  model, _ = load_model(str(tmp_path / "ckpt"), weights="raw")
  logits = np.asarray(_text_logits(model, io["input_ids"]))
  assert logits.shape == (2, 16, 324)
  # float32 on both sides: unit roundoff 6e-8, two layers of 64..128-term dot
  # products and a softmax in a different order give ~1e-6 on logits of size
  # ~4 (measured 1.7e-6); 2e-5 keeps 10x headroom and is still 1e5 below what a
  # misplaced or transposed weight does (O(1)).
  np.testing.assert_allclose(logits[..., :320], io["logits"], atol=2e-5, rtol=2e-5)


def test_llama_new_parameters_follow_the_reference_init(base):
  params, _config = llama.load_llama(str(TINY_LLAMA), base, seed=0)
  again, _ = llama.load_llama(str(TINY_LLAMA), base, seed=0)
  other, _ = llama.load_llama(str(TINY_LLAMA), base, seed=1)
  p, p2, q = _flat(params), _flat(again), _flat(other)
  hf = load_file(str(TINY_LLAMA / "model.safetensors"))
  np.testing.assert_array_equal(p[("embed_tokens",)][:320], hf["model.embed_tokens.weight"])
  np.testing.assert_array_equal(p[("lm_head",)][:, :320], hf["lm_head.weight"].T)
  for rows in (p[("embed_tokens",)][320:], p[("lm_head",)][:, 320:].T):
    assert rows.shape == (4, 64) and 0.014 < rows.std() < 0.026  # N(0, 0.02^2)
  for k in p:
    np.testing.assert_array_equal(p[k], p2[k])  # seeded
  assert not np.array_equal(p[("embed_tokens",)], q[("embed_tokens",)])
  np.testing.assert_array_equal(p[("embed_tokens",)][:320], q[("embed_tokens",)][:320])
  for k in (
    ("x_embedder", "kernel"),
    ("x_embedder", "bias"),
    ("adaln_module", "kernel"),
    ("adaln_module", "bias"),
    ("t_embedder", "fc1", "bias"),
    ("final_layer", "linear", "bias"),
    ("final_layer", "adaln", "bias"),
  ):
    assert not p[k].any(), k
  for k in (
    ("t_embedder", "fc1", "kernel"),
    ("t_embedder", "fc2", "kernel"),
    ("final_layer", "adaln", "kernel"),
    ("final_layer", "linear", "kernel"),
  ):
    assert 0.018 < p[k].std() < 0.022, k


def test_llama_built_into_shards_matches_single_device(base):
  mesh = make_mesh(dict(data=1, fsdp=2, tensor=4))  # vocab 324 over 4: a shard holds old + new rows
  single, _ = llama.load_llama(str(TINY_LLAMA), base, seed=0)
  sharded, _ = llama.load_llama(
    str(TINY_LLAMA), base, seed=0, shardings_fn=lambda c: param_shardings(c, mesh)
  )
  assert len(sharded["embed_tokens"].addressable_shards) == 8
  chex.assert_trees_all_equal(single, sharded)


def test_train_init_from_a_converted_llama(tmp_path):
  config = official.with_model_fields(config_file("digits"), dict(attention_impl="xla"))
  config.data.batch_size = 32  # the 8 simulated devices' batch shards divide 32 rows, not 28
  config = llama.convert_llama(str(TINY_LLAMA), str(tmp_path / "ckpt"), config, seed=0)
  converted, _, _ = load_params(str(tmp_path / "ckpt"), weights="raw")
  config.train.init_from = str(tmp_path / "ckpt")
  mesh = make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    _, state, _ = initial_state(config, mesh, make_optimizer(config.optim)[0])
  assert int(state["step"]) == 0
  chex.assert_trees_all_equal(state["params"], converted)
  chex.assert_trees_all_equal(state["ema"], converted)
  # EMA must not share buffers with params: the train step donates both.
  pointers = lambda tree: {
    x.addressable_shards[0].data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)
  }
  assert not pointers(state["params"]) & pointers(state["ema"])
  assert not any(
    np.asarray(x).any() for x in jax.tree.leaves(state["opt_state"]) if np.asarray(x).ndim
  )  # fresh AdamW moments

  config.train.update(init_from=str(tmp_path / "ckpt"), num_steps=1)
  config.model.num_layers = 3  # another model size
  with pytest.raises(
    ValueError,
    match=r"(?s)\['layers'\]\['attn'\]\['wk'\]: \(2, 64, 2, 16\) "
    r"in the checkpoint, \(3, 64, 2, 16\) for this config.*Set "
    r"model.num_layers=2 there, 3 here to the checkpoint's values",
  ):
    train_and_evaluate(config, str(tmp_path / "run2"), sample_at_end=False)


# -------------------------------------------------------------------- errors


def _edited_fixture(fixture_dir, dst, edit_weights=None, edit_config=None):
  os.makedirs(dst)
  tensors = load_file(str(fixture_dir / "weights.safetensors"))
  if edit_weights:
    edit_weights(tensors)
  save_file(tensors, str(dst / "weights.safetensors"))
  hf = json.loads((fixture_dir / "config.json").read_text())
  if edit_config:
    edit_config(hf)
  (dst / "config.json").write_text(json.dumps(hf))
  return dst


def test_wrong_shape_names_key_shapes_and_config_value(fixture_dir, base, tmp_path):
  def edit(t):
    t["model.layers.1.mlp.up_proj.weight"] = np.zeros((170, 64), np.float32)

  path = _edited_fixture(fixture_dir, tmp_path / "w", edit)
  with pytest.raises(ValueError) as e:
    official.load_official(str(path), base)
  msg = str(e.value)
  assert "model.layers.1.mlp.up_proj.weight: shape (170, 64) in the weights, (176, 64)" in msg
  assert "model.mlp_dim=176 here, 170 in the weights" in msg


def test_missing_and_unexpected_keys_are_named(fixture_dir, base, tmp_path):
  def edit(t):
    del t["final_layer.linear.bias"]
    t["t_projector.0.weight"] = np.zeros((64, 64), np.float32)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored

  path = _edited_fixture(fixture_dir, tmp_path / "w", edit)
  with pytest.raises(ValueError) as e:
    official.load_official(str(path), base)
  msg = str(e.value)
  assert "final_layer.linear.bias: missing from the weights" in msg
  assert "t_projector.0.weight: in the weights, not a parameter of this model" in msg
  assert "inv_freq" not in msg


def test_another_model_size_names_the_config_values(fixture_dir, base, tmp_path):
  path = _edited_fixture(
    fixture_dir, tmp_path / "deeper", None, lambda hf: hf.update(num_hidden_layers=3)
  )
  with pytest.raises(
    ValueError,
    match=r"the weights have 2 decoder layers.*"
    r"model.num_layers=3: set model.num_layers=2",
  ):
    official.load_official(str(path), base)
  path = _edited_fixture(
    fixture_dir,
    tmp_path / "wider",
    None,
    lambda hf: hf.update(hidden_size=128, intermediate_size=352),
  )
  with pytest.raises(ValueError, match=r"model.hidden_size=128 here, 64 in the weights"):
    official.load_official(str(path), base)


def test_llama_errors(fixture_dir, base, tmp_path):
  with pytest.raises(ValueError, match="is an official MonoFormer config.*convert official"):
    llama.load_llama(str(fixture_dir), base)
  shutil.copytree(TINY_LLAMA, tmp_path / "l")
  hf = json.loads((tmp_path / "l" / "config.json").read_text())
  (tmp_path / "l" / "config.json").write_text(json.dumps({**hf, "vocab_size": 330}))
  with pytest.raises(
    ValueError,
    match=r"model.embed_tokens.weight: shape \(320, 64\) in the "
    r"weights, \(330, 64\).*model.vocab_size - 4 added tokens=330 here, 320",
  ):
    llama.load_llama(str(tmp_path / "l"), base)
  with pytest.raises(FileNotFoundError, match="config.json"):
    llama.load_llama(str(tmp_path), base)


def test_imagenet256_config_is_the_paper_model_and_asks_for_its_data(tmp_path):
  config = official.default_config()
  _, abstract, _ = abstract_model(config.model)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  assert 1.10e9 < count < 1.13e9, count  # TinyLlama's 1.1B + the image side
  with pytest.raises(
    ValueError,
    match=r"data.dir is empty: point it at the imagenet dataset "
    r"prepared by `python -m monoformer_jax.data.prepare imagenet`",
  ):
    train_and_evaluate(config, str(tmp_path))


def test_reader_takes_bfloat16_float16_and_reads_slices(tmp_path):
  # TinyLlama ships bfloat16, which safetensors' numpy backend cannot read.
  import struct

  import ml_dtypes

  rng = np.random.default_rng(0)
  arrays = {
    "a": rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16),
    "b": rng.standard_normal((3, 4)).astype(np.float16),
  }
  header, blobs, offset = {}, [], 0
  for key, x in arrays.items():
    header[key] = {
      "dtype": {"bfloat16": "BF16", "float16": "F16"}[x.dtype.name],
      "shape": list(x.shape),
      "data_offsets": [offset, offset + x.nbytes],
    }
    blobs.append(x.tobytes())
    offset += x.nbytes
  text = json.dumps(header).encode()
  (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
  with SafetensorsSource(str(tmp_path / "m.safetensors")) as source:
    assert source.dtype("a") == "BF16" and source.shape("a") == (6, 5)
    for key, x in arrays.items():
      np.testing.assert_array_equal(source.read(key), x.astype(np.float32))
      assert source.read(key).dtype == np.float32
    np.testing.assert_array_equal(
      source.read("a", (slice(2, 5), slice(1, 3))), arrays["a"].astype(np.float32)[2:5, 1:3]
    )
