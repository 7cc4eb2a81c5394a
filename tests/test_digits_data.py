"""The embedded digits data: batches from the real config, the row of one
digit, the mix, determinism, epochs and the truth of every sentence."""

import collections
import re

import numpy as np
import pytest
from helpers import config_file

from monoformer_jax.data import prompts
from monoformer_jax.data.datasets import make_batches
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.data.sharded import merge_data_states
from monoformer_jax.digits import source as digits
from monoformer_jax.layout import row_spec
from monoformer_jax.text.tokenizer import ByteTokenizer
from monoformer_jax.vision.pixels import to_unit_range

TOK = ByteTokenizer()
N_DIGITS = 1797


def digits_config():
  return config_file("digits")


def is_text_only(example):
  return not len(example.images)


def is_reading(example):
  """Reads a digit and answers about it (an edit reads and draws)."""
  return all(example.read_flags()) and bool(example.images)


def is_edit(example):
  """Draws the next digit after reading one, or after its instruction alone
  (the source dropped for guidance; both dropped, it is an unprompted image)."""
  return example.read_flags() == [True, False] or (
    len(example.images) == 1 and prompt_of(example) == digits.EDIT_PROMPT
  )


def prompt_of(example):
  """The prompt text of an image example ("" for the guidance-null one)."""
  ids = list(example.ids)
  return TOK.decode(ids[1 : ids.index(TOK.im_start_id)])


def test_batch_from_the_real_config():
  config = digits_config()
  batch = next(make_batches(config, TOK))
  r, length, m = config.data.batch_size, config.data.seq_len, config.data.max_images_per_row
  p = row_spec(config, TOK).tokens_per_image
  n_read = config.data.max_read_images_per_row
  shapes = dict(
    tokens=(r, length),
    segment_ids=(r, length),
    image_ids=(r, length),
    positions=(r, length),
    image_columns=(r, m, p),
    image_valid=(r, m),
    cond_columns=(r, m),
    read_columns=(r, n_read, p),
    read_valid=(r, n_read),
    read_cond_columns=(r, n_read),
    targets=(r, length),
    text_weights=(r, length),
    latents=(r, m, 8, 8, 1),
    read_images=(r, n_read, 8, 8, 1),
    examples_cut=(r,),  # the host's count (layout.HOST_KEYS)
  )
  assert {k: v.shape for k, v in batch.items()} == shapes
  # The default reads digits too (data.read_fraction): real digits, causal tokens.
  assert batch["read_valid"].any() and n_read > 0
  read_images = batch["read_images"][batch["read_valid"]]
  assert (np.abs(read_images).reshape(len(read_images), -1).max(axis=1) > 0).all()
  cols = batch["read_columns"][batch["read_valid"]]
  rows_of = np.nonzero(batch["read_valid"])[0]
  assert (batch["image_ids"][rows_of[:, None], cols] == 0).all()
  for name in ("tokens", "segment_ids", "image_ids", "positions", "targets"):
    assert batch[name].dtype == np.int32, name
  assert batch["text_weights"].dtype == batch["latents"].dtype == np.float32
  assert 0 <= batch["tokens"].min() and batch["tokens"].max() < TOK.vocab_size
  assert TOK.vocab_size <= config.model.vocab_size
  assert set(np.unique(batch["text_weights"])) <= {0.0, 1.0}
  assert batch["latents"].min() >= -1 and batch["latents"].max() <= 1
  # First-fit packing: short examples fill the gaps the interleaved ones (up
  # to ~100 tokens) leave, 91-94% of a batch real tokens (in-order next-fit
  # packing: 80%).
  assert (batch["segment_ids"] > 0).mean() > 0.88, "rows are poorly packed"
  for row in range(r):
    ids = batch["image_ids"][row]
    n = ids.max()
    assert [int((ids == k).sum()) for k in range(1, n + 1)] == [p] * n
    assert (batch["tokens"][row][ids > 0] == TOK.image_id).all()
    # Real digits are never all zeros in [-1, 1]; unused slots are.
    used = np.abs(batch["latents"][row]).reshape(m, -1).max(axis=1) > 0
    np.testing.assert_array_equal(used, np.arange(m) < n)
    np.testing.assert_array_equal(batch["image_valid"][row], used)
  # The reference's default: no image example trains text, but for the
  # interleaved ones ("here is a seven: <image>."), whose text says where to draw.
  seg, image_ids = batch["segment_ids"], batch["image_ids"]
  has_image = np.stack([np.isin(seg[b], seg[b][image_ids[b] > 0]) for b in range(r)])
  start = TOK.encode(digits.INTERLEAVED_PROMPT)
  interleaved = np.stack(
    [
      np.isin(
        seg[b],
        [
          k
          for k in np.unique(seg[b])
          if k and list(batch["tokens"][b][seg[b] == k][1 : 1 + len(start)]) == start
        ],
      )
      for b in range(r)
    ]
  )
  assert not (batch["text_weights"] * (has_image & ~interleaved)).any()
  assert (batch["text_weights"] * interleaved).any()
  assert batch["text_weights"].sum() > 0
  # A reading example trains its answer: text weight inside its segment.
  b0, c0 = rows_of[0], cols[0, 0]
  assert (batch["text_weights"][b0] * (seg[b0] == seg[b0, c0])).sum() > 0


def test_row_of_one_digit_token_by_token():
  config = digits_config()
  seven = prompts.class_prompt(digits.CLASS_NAMES[7])
  example = prompts.image_prompt_example(seven, TOK, (8, 8, 1))
  assert seven == "Please generate an image of seven."
  prompt = [3 + b for b in b"Please generate an image of seven."]
  assert list(example.ids) == [1] + prompt + [261, 260, 262, 13, 2]
  null = prompts.image_prompt_example(None, TOK, (8, 8, 1))
  assert list(null.ids) == list(prompts.image_prompt_example("", TOK, (8, 8, 1)).ids)
  assert list(null.ids) == [1, 261, 260, 262, 13, 2]
  batch = pack_examples([example], row_spec(config, TOK))
  n = 1 + len(prompt) + 1  # bos, prompt, <|im_start|>
  expected_tokens = [1] + prompt + [261] + [260] * 16 + [262, 13, 2]
  used = len(expected_tokens)
  np.testing.assert_array_equal(batch["tokens"][0], expected_tokens + [259] * (128 - used))
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * used + [0] * (128 - used))
  np.testing.assert_array_equal(batch["image_ids"][0], [0] * n + [1] * 16 + [0] * (128 - n - 16))
  np.testing.assert_array_equal(batch["positions"][0][:used], np.arange(used))
  np.testing.assert_array_equal(batch["targets"][0][: used - 1], expected_tokens[1:])
  assert not batch["text_weights"].any() and not batch["latents"].any()


def test_images_scale_and_inverse():
  from sklearn.datasets import load_digits

  images, labels = digits.load_digit_images()
  assert images.shape == (N_DIGITS, 8, 8, 1) and images.dtype == np.float32
  assert images.min() == -1 and images.max() == 1
  np.testing.assert_allclose(to_unit_range(images)[..., 0] * 16, load_digits().images)
  assert sorted(set(labels.tolist())) == list(range(10))


def test_mix_and_guidance_drop_match_the_config():
  config = digits_config()
  stream = digits.digits_example_stream(config, TOK, seed=0)
  examples = [stream(i) for i in range(4000)]
  text = [e for e in examples if is_text_only(e)]
  reads = [e for e in examples if is_reading(e)]
  interleaved = [e for e in examples if e.interleaved]
  images = [
    e
    for e in examples
    if not is_text_only(e) and not is_reading(e) and not e.interleaved and not is_edit(e)
  ]
  assert abs(len(text) / len(examples) - config.data.text_fraction) < 0.01
  assert abs(len(reads) / len(examples) - config.data.read_fraction) < 0.01
  assert abs(len(interleaved) / len(examples) - config.data.interleaved_fraction) < 0.01
  image_share = (
    1
    - config.data.text_fraction
    - config.data.read_fraction
    - config.data.interleaved_fraction
    - config.data.edit_fraction
  )
  assert abs(len(images) / len(examples) - image_share) < 0.02
  # A reading example reads one real digit, held out never, and answers its name.
  all_images, labels = digits.load_digit_images()
  label_of = collections.defaultdict(set)
  for image, label in zip(all_images, labels):
    label_of[image.tobytes()].add(int(label))
  held = digits.reading_split(digits.digit_records(config))[1]
  held = {np.asarray(held[i]["image"], np.float32).tobytes() for i in range(len(held))}
  for e in reads[:300]:
    (image,) = e.images
    assert image.tobytes() not in held
    answer = TOK.decode([t for t, m in zip(e.ids, e.text_mask) if m][:-1])
    assert digits.answer_label(answer) in label_of[image.tobytes()], answer
    assert TOK.decode(list(e.ids)[4:]).startswith("\n" + digits.READ_PROMPT)
  dropped = sum(prompt_of(e) == "" for e in images) / len(images)
  assert abs(dropped - config.data.cfg_drop_prob) < 0.025
  assert all(e.train_text for e in examples)
  # Every prompt is a template filled with the name of the digit it shows.
  templates = collections.Counter()
  for e in images[:500]:
    prompt = prompt_of(e)
    if prompt:
      names = {
        prompts.TEMPLATES[t].format(digits.CLASS_NAMES[k]): t
        for k in label_of[e.images[0].tobytes()]
        for t in range(4)
      }
      assert prompt in names, prompt
      templates[names[prompt]] += 1
  assert set(templates) == {0, 1, 2, 3}


def test_same_seed_same_stream_other_seed_other_stream():
  config = digits_config()
  a, b = (digits.digits_example_stream(config, TOK, seed=0) for _ in range(2))
  c = digits.digits_example_stream(config, TOK, seed=1)
  indices = [0, 1, 2, 127, 128, 5000, 10**9 + 7]
  same = lambda x, y: (
    list(x.ids) == list(y.ids)
    and len(x.images) == len(y.images)
    and all((u == v).all() for u, v in zip(x.images, y.images))
  )
  assert all(same(a(i), b(i)) for i in indices)
  assert not all(same(a(i), c(i)) for i in range(20))


def test_every_digit_once_per_epoch_in_a_new_order():
  config = digits_config()
  # The image examples alone: an edit with both conditions dropped looks like one.
  config.data.update(interleaved_fraction=0.0, edit_fraction=0.0)
  stream = digits.digits_example_stream(config, TOK, seed=0)
  seen, i = [], 0
  while len(seen) < 2 * N_DIGITS:
    e = stream(i)
    i += 1
    if not is_text_only(e) and not is_reading(e):
      seen.append(e.images[0].tobytes())
  all_images = [x.tobytes() for x in digits.load_digit_images()[0]]
  first, second = seen[:N_DIGITS], seen[N_DIGITS:]
  assert sorted(first) == sorted(all_images) == sorted(second)
  assert first != second


SENTENCE = re.compile(
  r"^(?:(?P<a>\w+) (?P<op>plus|minus|times) (?P<b>\w+) is (?P<r>\w+)"
  r"|the number (?P<rel>after|before) (?P<n>\w+) is (?P<m>\w+)"
  r"|(?P<p>\w+) is an (?P<parity>even|odd) number)\.$"
)


def check_true(sentence):
  number = {w: k for k, w in enumerate(digits.NUMBER_WORDS)}
  match = SENTENCE.match(sentence)
  assert match, sentence
  g = {k: v for k, v in match.groupdict().items() if v is not None}
  if "op" in g:
    a, b, r = number[g["a"]], number[g["b"]], number[g["r"]]
    assert {"plus": a + b, "minus": a - b, "times": a * b}[g["op"]] == r, sentence
  elif "rel" in g:
    assert number[g["m"]] - number[g["n"]] == (1 if g["rel"] == "after" else -1), sentence
  else:
    assert (number[g["p"]] % 2 == 0) == (g["parity"] == "even"), sentence
  return g.get("op") or g.get("rel") or g["parity"]


def test_every_sentence_is_true():
  rng = np.random.default_rng(0)
  kinds = collections.Counter(check_true(digits.number_sentence(rng)) for _ in range(3000))
  assert set(kinds) == {"plus", "minus", "times", "after", "before", "even", "odd"}
  stream = digits.digits_example_stream(digits_config(), TOK, seed=3)
  for e in (stream(i) for i in range(400)):
    if is_text_only(e):
      assert e.ids[0] == TOK.bos_id and e.ids[-1] == TOK.eos_id
      check_true(TOK.decode(e.ids))


def test_hosts_and_resume():
  config = digits_config()
  hosts = [make_batches(config, TOK, process_index=h, process_count=2) for h in range(2)]
  first = [next(h) for h in hosts]
  assert first[0]["tokens"].shape == (config.data.batch_size // 2, config.data.seq_len)
  assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])
  state = merge_data_states([h.get_state() for h in hosts])  # as a checkpoint holds it
  want = next(hosts[0])
  got = next(make_batches(config, TOK, process_index=0, process_count=2, state=state))
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  with pytest.raises(ValueError, match="not divisible by 3"):
    make_batches(config, TOK, process_count=3)


def test_the_digits_folder_is_checked_before_anything_is_read(tmp_path, monkeypatch):
  """MONOFORMER_DATA_DIR or data.dir naming a file or a place that cannot be
  written is one line naming where it came from (was an OSError from
  os.makedirs deep in the data pipeline); set but empty, the default folder."""
  from monoformer_jax.errors import PathError
  from monoformer_jax.train.checks import check_train_config

  afile = tmp_path / "afile"
  afile.write_text("x")
  config = config_file("digits:tiny")
  monkeypatch.setenv(digits.DATA_DIR_VARIABLE, str(afile))
  with pytest.raises(
    PathError,
    match=r"^MONOFORMER_DATA_DIR='.*afile' is a file, not a folder; pass a folder for the "
    r"digits' prepared copy",
  ):
    check_train_config(config)
  monkeypatch.setenv(digits.DATA_DIR_VARIABLE, str(afile / "under"))
  with pytest.raises(PathError, match=r"^MONOFORMER_DATA_DIR='.*under': cannot write .*Not a dir"):
    check_train_config(config)
  config.data.dir = str(afile)  # the config's folder comes first
  with pytest.raises(PathError, match=r"^--config.data.dir='.*afile' is a file, not a folder"):
    check_train_config(config)
  assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
  config.data.dir = ""
  monkeypatch.setenv(digits.DATA_DIR_VARIABLE, "")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  default = tmp_path / "home" / ".cache" / "monoformer_jax"
  assert digits.cache_dir(config) == str(default) and default.is_dir()
