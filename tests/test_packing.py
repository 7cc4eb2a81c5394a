"""The packed row: layouts token by token, the fit boundary, errors, long texts,
iterator state and per-host streams."""

import numpy as np
import pytest

from monoformer_jax.data.packing import PackedBatches, pack_examples
from monoformer_jax.data.sharded import host_stream
from monoformer_jax.layout import Example, PromptLayout, Row, RowSpec, image_slots, prompt_rows
from monoformer_jax.text.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id
IMG, S, E = TOK.image_id, TOK.im_start_id, TOK.im_end_id
SHAPE = (2, 2, 1)


def spec(text_on_image_examples=False, seq_len=16, max_images=2):
  return RowSpec(
    seq_len=seq_len,
    max_images=max_images,
    image_shape=SHAPE,
    tokens_per_image=3,
    image_id=IMG,
    pad_id=PAD,
    text_on_image_examples=text_on_image_examples,
  )


def img(value):
  return np.full(SHAPE, value, np.float32)


def text(n, start=10, train_text=True):
  return Example([start + k for k in range(n)], (), train_text)


# Rows of L = 16 with P = 3 slots per image and at most M = 2 images per row.
# Row 0: A (text) + B (image); C does not fit there (12 + 7 > 16).
# Row 1: C (image) + F (image, the row's 2nd) + D (text): 7 + 5 + 3 = 15.
# Row 2: G (two images) opens a row: row 1 has no room left for images.
EXAMPLES = [
  Example([BOS, 10, 11, EOS]),  # A
  Example([BOS, 12, S, IMG, E, EOS], [img(1.0)]),  # B
  Example([BOS, S, IMG, E, EOS], [img(2.0)]),  # C
  Example([S, IMG, E], [img(3.0)]),  # F
  Example([BOS, 13, EOS]),  # D
  Example([S, IMG, IMG, E], [img(4.0), img(5.0)]),  # G
]
EXPECTED = dict(
  tokens=[
    [BOS, 10, 11, EOS, BOS, 12, S, IMG, IMG, IMG, E, EOS, PAD, PAD, PAD, PAD],
    [BOS, S, IMG, IMG, IMG, E, EOS, S, IMG, IMG, IMG, E, BOS, 13, EOS, PAD],
    [S, IMG, IMG, IMG, IMG, IMG, IMG, E, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
  ],
  segment_ids=[
    [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
  ],
  image_ids=[
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  ],
  positions=[
    [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0],
    [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1, 2, 0],
    [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0],
  ],
  targets=[
    [10, 11, EOS, 0, 12, S, IMG, IMG, IMG, E, EOS, 0, 0, 0, 0, 0],
    [S, IMG, IMG, IMG, E, EOS, 0, IMG, IMG, IMG, E, 0, 13, EOS, 0, 0],
    [IMG, IMG, IMG, IMG, IMG, IMG, E, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  ],
  # Per slot, the columns of its image's tokens; 16 (past the row) when empty.
  image_columns=[[[7, 8, 9], [16, 16, 16]], [[2, 3, 4], [8, 9, 10]], [[1, 2, 3], [4, 5, 6]]],
)
IMAGE_VALID = [[True, False], [True, True], [True, True]]
# The reference: CE on text-only examples only.
WEIGHTS_REFERENCE = [
  [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
  [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
]
# Transfusion-style: also image examples' text, never a target on an image slot
# (the last image slot predicting <|im_end|> trains).
WEIGHTS_ON_IMAGES = [
  [1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
  [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0],
  [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
]


@pytest.mark.parametrize("on_images", [False, True])
def test_rows_token_by_token(on_images):
  batch = pack_examples(EXAMPLES, spec(on_images))
  for name, expected in EXPECTED.items():
    np.testing.assert_array_equal(batch[name], expected, err_msg=name)
    assert batch[name].dtype == np.int32, name
  np.testing.assert_array_equal(batch["image_valid"], IMAGE_VALID)
  assert batch["image_valid"].dtype == bool
  weights = WEIGHTS_ON_IMAGES if on_images else WEIGHTS_REFERENCE
  np.testing.assert_array_equal(batch["text_weights"], weights)
  assert batch["text_weights"].dtype == np.float32
  latents = batch["latents"]
  assert latents.shape == (3, 2) + SHAPE and latents.dtype == np.float32
  np.testing.assert_array_equal(latents[..., 0, 0, 0], [[1, 0], [2, 3], [4, 5]])


def test_example_that_trains_no_text():
  batch = pack_examples([text(4, train_text=False), text(3)], spec())
  np.testing.assert_array_equal(batch["text_weights"][0, :7], [0, 0, 0, 0, 1, 1, 0])


def test_matches_the_reference_fixture(fixture_dir):
  """The reference's two rows (an image row, a text row), packed one per row."""
  io = np.load(fixture_dir / "io.npz")
  ids, attention = io["input_ids"], io["input_attention_mask"]
  x0 = io["x_start"].transpose(0, 2, 3, 1)  # [B, C, h, w] -> channels last
  fixture_spec = RowSpec(
    seq_len=27,
    max_images=1,
    image_shape=x0.shape[1:],
    tokens_per_image=16,
    image_id=257,
    pad_id=256,
  )
  examples = [
    Example(ids[0][attention[0]], [x0[0]], train_text=True),
    Example(ids[1][attention[1]], (), train_text=True),
  ]
  batch = pack_examples(examples, fixture_spec, one_per_row=True)
  for name in ("tokens", "segment_ids", "image_ids", "positions"):
    np.testing.assert_array_equal(batch[name], io[name], err_msg=name)
  np.testing.assert_array_equal(batch["text_weights"], io["text_loss_weight"])
  # The fixture writes 0 for targets on image slots; ours hold <image> there.
  next_is_image = np.zeros_like(batch["image_ids"], bool)
  next_is_image[:, :-1] = batch["image_ids"][:, 1:] > 0
  np.testing.assert_array_equal(np.where(next_is_image, 0, batch["targets"]), io["targets"])
  np.testing.assert_array_equal(batch["latents"][:, 0], np.stack([x0[0], 0 * x0[1]]))


def test_fit_boundary_is_exactly_seq_len():
  assert pack_examples([text(10), text(6)], spec())["tokens"].shape == (1, 16)
  assert pack_examples([text(10), text(7)], spec())["tokens"].shape == (2, 16)
  full = pack_examples([text(16)], spec())
  assert full["tokens"].shape == (1, 16) and (full["segment_ids"] == 1).all()
  # 1 + 3 + 1 text tokens + 3 images of 3 slots = 16 exactly: fits with M = 3.
  three = Example([BOS, S, IMG, IMG, IMG, EOS], [img(1), img(2), img(3)])
  assert pack_examples([three], spec(max_images=3))["tokens"].shape == (1, 16)
  # An image example fitting the space left but not the image budget opens a row.
  batch = pack_examples(
    [Example([S, IMG, E], [img(1)]), Example([S, IMG, IMG, E], [img(2), img(3)])], spec()
  )
  np.testing.assert_array_equal(batch["segment_ids"].max(axis=1), [1, 1])


def test_image_example_one_token_too_long_raises():
  ok = Example([BOS] + [20] * 10 + [S, IMG, E], [img(1)])  # 14 ids + 3 - 1 = 16
  assert pack_examples([ok], spec())["tokens"].shape == (1, 16)
  too_long = Example([BOS] + [20] * 11 + [S, IMG, E], [img(1)])
  with pytest.raises(
    ValueError,
    match=r"example 1 needs 17 tokens \(text 14 \+ 1 image\(s\) "
    r"of 3\) but data.seq_len is 16; .*at least 17",
  ):
    pack_examples([ok, too_long], spec())


def test_too_many_images_raises():
  example = Example([S, IMG, IMG, IMG, E], [img(1), img(2), img(3)])
  with pytest.raises(
    ValueError,
    match=r"example 0 has 3 images .*max_images_per_row=2.*"
    r"at least 3",
  ):
    pack_examples([example], spec())


def test_wrong_image_shape_raises():
  example = Example([S, IMG, E], [np.zeros((4, 4, 1), np.float32)])
  with pytest.raises(ValueError, match=r"image 0 has shape \(4, 4, 1\) .* \(2, 2, 1\)"):
    pack_examples([example], spec())


@pytest.mark.parametrize(
  "ids,images,counts",
  [
    ([S, IMG, IMG, E], [img(1)], "2 <image> placeholders .* but 1 images"),
    ([S, E], [img(1)], "0 <image> placeholders .* but 1 images"),
  ],
)
def test_placeholder_image_mismatch_raises(ids, images, counts):
  with pytest.raises(ValueError, match=counts):
    pack_examples([Example(ids, images)], spec())


def test_long_text_is_split_and_nothing_is_lost():
  long = text(40, start=30)
  batch = pack_examples([text(3), long, text(5, start=100)], spec())
  # Pieces of 16, 16 and 8 tokens: the 3-token text keeps row 0 to itself.
  np.testing.assert_array_equal(batch["segment_ids"].max(axis=1), [1, 1, 1, 2])
  kept = [batch["tokens"][r][batch["segment_ids"][r] > 0] for r in range(4)]
  np.testing.assert_array_equal(
    np.concatenate(kept), list(range(10, 13)) + list(range(30, 70)) + list(range(100, 105))
  )
  # Each piece is its own example: positions restart and no target crosses a cut.
  np.testing.assert_array_equal(batch["positions"][2, :8], np.arange(8))
  assert batch["targets"][1, 15] == 0 and batch["text_weights"][1, 15] == 0


def synthetic_stream(i):
  """Deterministic examples of varied sizes; every 3rd carries 1 or 2 images."""
  rng = np.random.default_rng(i)
  if i % 3 == 0:
    n = 1 + i % 2
    return Example([BOS, 1000 + i, S] + [IMG] * n + [E, EOS], [img(i)] * n)
  # Texts up to 2 * L tokens, so some are split.
  return Example([BOS] + [1000 + i] * int(rng.integers(1, 30)) + [EOS])


def batches(start_index=0, rows=3):
  return PackedBatches(synthetic_stream, rows=rows, spec=spec(), start_index=start_index)


def test_iterator_state_round_trip():
  it = batches()
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert set(state) == {"next_example"}
  expected = [next(it), next(it)]
  restored = batches()
  restored.set_state(state)
  for want, got in zip(expected, [next(restored), next(restored)]):
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert batches(start_index=state["next_example"]).get_state() == state


def _pieces(i, length=16):
  """Example i of synthetic_stream as (tokens without <image>, expanded
  length, images) per piece: a text cut every `length` tokens."""
  ids = synthetic_stream(i).ids
  if IMG in ids:
    return [([t for t in ids if t != IMG], len(ids) + 2 * ids.count(IMG), ids.count(IMG))]
  return [(ids[k : k + length], len(ids[k : k + length]), 0) for k in range(0, len(ids), length)]


def test_iterator_packs_first_fit_and_keeps_every_example():
  """Replayed on token and image counts alone: each batch holds the next run
  of the stream, every example whole and once, each piece in the first row
  that had room for it (16 tokens, 2 images) when it came; the example that
  opens the next batch fit no row of this one."""
  it, first, gaps_filled = batches(), 0, 0
  for _ in range(16):
    batch = next(it)
    free, images, rows = [16] * 3, [0] * 3, [[], [], []]

    def place(i, free=free, images=images):
      """Rows of example i's pieces, or None where one fits no row."""
      trial_free, trial_images, where = list(free), list(images), []
      for _piece, n, k in _pieces(i):
        r = next((r for r in range(3) if trial_free[r] >= n and trial_images[r] + k <= 2), None)
        if r is None:
          return None
        trial_free[r] -= n
        trial_images[r] += k
        where.append(r)
      free[:], images[:] = trial_free, trial_images
      return where

    for i in range(first, it.next_example):
      where = place(i)
      assert where is not None, f"example {i} was packed where the rule finds no room"
      for (piece, _, _), r in zip(_pieces(i), where):
        gaps_filled += any(rows[later] for later in range(r + 1, 3))
        rows[r].append(piece)
    assert place(it.next_example) is None, "the batch ended while the next example fit"
    for r in range(3):
      seg, tok = batch["segment_ids"][r], batch["tokens"][r]
      got = [[t for t in tok[seg == s] if t != IMG] for s in range(1, seg.max() + 1)]
      assert got == rows[r], (first, r)
    first = it.next_example
  # Pieces went back to rows before the last one opened (next-fit never does).
  assert gaps_filled >= 3, gaps_filled


def test_iterator_rejects_a_text_longer_than_a_batch():
  it = PackedBatches(lambda i: text(50), rows=2, spec=spec())
  with pytest.raises(ValueError, match=r"example 0 is a text of 50 tokens: 4 pieces"):
    next(it)


def test_host_streams_are_disjoint_and_cover():
  count, n = 3, 20
  taken = [[host_stream(lambda i: i, h, count)(i) for i in range(n)] for h in range(count)]
  flat = sorted(x for host in taken for x in host)
  assert flat == list(range(count * n))
  with pytest.raises(ValueError, match="process_index=3"):
    host_stream(lambda i: i, 3, 3)


def test_image_slots_read_the_rows_and_reject_what_packing_never_makes():
  ids = np.array([[0, 1, 1, 1, 0, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0]])
  columns, valid = image_slots(ids, 3, 3)
  np.testing.assert_array_equal(
    columns, [[[1, 2, 3], [5, 6, 7], [8, 8, 8]], [[8, 8, 8], [8, 8, 8], [8, 8, 8]]]
  )
  np.testing.assert_array_equal(valid, [[True, True, False], [False, False, False]])
  with pytest.raises(ValueError, match="row 0 holds 2 tokens of image 1"):
    image_slots(np.array([[0, 1, 1, 0]]), 1, 3)
  with pytest.raises(ValueError, match="row 1 holds 3 tokens of image 1, not one contiguous"):
    image_slots(np.array([[1, 1, 1, 0], [1, 0, 1, 1]]), 1, 3)
  with pytest.raises(ValueError, match="image 2 but a row holds at most 1"):
    image_slots(np.array([[1, 1, 1, 2]]), 1, 3)


def test_prompt_rows_token_by_token():
  rows = prompt_rows(
    [[BOS, 10, 11], [BOS]], pad_id=PAD, new_tokens=3, new_token_id=IMG, image=True, multiple=4
  )
  assert rows.layout == PromptLayout(prompt_len=4, new_tokens=3)
  assert rows.layout.new_column(2) == 6 and rows.layout.length == 7
  row = rows.row
  assert isinstance(row, Row)
  np.testing.assert_array_equal(
    row.tokens, [[PAD, BOS, 10, 11, IMG, IMG, IMG], [PAD, PAD, PAD, BOS, IMG, IMG, IMG]]
  )
  np.testing.assert_array_equal(row.segment_ids, [[0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(row.positions, [[0, 0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2, 3]])
  np.testing.assert_array_equal(row.image_ids, [[0, 0, 0, 0, 1, 1, 1]] * 2)
  np.testing.assert_array_equal(row.image_columns, [[[4, 5, 6]]] * 2)
  np.testing.assert_array_equal(row.image_valid, [[True], [True]])
  np.testing.assert_array_equal(rows.layout.new(row.tokens), [[IMG, IMG, IMG]] * 2)
  text = prompt_rows([[BOS, 10]], pad_id=PAD, new_tokens=2, multiple=1).row
  assert text.image_columns.shape[1] == 0 and not text.image_ids.any()


F, T = False, True


def test_text_mask_picks_the_targets():
  # Target l + 1 trains iff its mask entry is True: 10 and 11 here, not 12 or eos.
  masked = Example([BOS, 10, 11, 12, EOS], text_mask=[F, T, T, F, F])
  # On an image example (CE on its text switched on) a placeholder's entry is
  # False and its P = 3 slots are never targets: 12, <|im_end|> and eos train.
  image = Example([BOS, 12, S, IMG, E, EOS], [img(1)], text_mask=[F, T, F, F, T, T])
  batch = pack_examples([masked, image], spec(text_on_image_examples=True))
  np.testing.assert_array_equal(
    batch["text_weights"], [[1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]]
  )
  off = pack_examples([masked, image], spec())  # the reference: no CE on image examples
  np.testing.assert_array_equal(
    off["text_weights"], [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
  )
  # The iterator packs masks the same way.
  it = PackedBatches(lambda i: [masked, image][i % 2], rows=1, spec=spec(True))
  np.testing.assert_array_equal(next(it)["text_weights"], batch["text_weights"])
  # An all-True mask is no mask.
  whole = pack_examples([Example([BOS, 10, 11, EOS], text_mask=[T] * 4)], spec())
  plain = pack_examples([Example([BOS, 10, 11, EOS])], spec())
  np.testing.assert_array_equal(whole["text_weights"], plain["text_weights"])


def test_split_long_text_keeps_its_mask():
  mask = [14 <= k <= 20 for k in range(40)]  # targets: ids 14 .. 20 of 40
  batch = pack_examples([Example(list(range(30, 70)), text_mask=mask)], spec())
  # Pieces: ids 0-15, 16-31, 32-39. Ids 14 and 15 train from columns 13 and 14;
  # id 16 opens piece 1 and is nobody's target; ids 17-20 from columns 0-3.
  np.testing.assert_array_equal(
    batch["text_weights"], [[0] * 13 + [1, 1, 0], [1, 1, 1, 1] + [0] * 12, [0] * 16]
  )


def test_bad_text_mask_raises():
  with pytest.raises(
    ValueError,
    match=r"example 1: text_mask has shape \(3,\) but the "
    r"example has 4 ids",
  ):
    pack_examples([text(2), Example([BOS, 10, 11, EOS], text_mask=[T, T, T])], spec())
  with pytest.raises(
    ValueError,
    match=r"example 0: text_mask is True at id 2, an <image> "
    "placeholder",
  ):
    pack_examples([Example([BOS, S, IMG, E], [img(1)], text_mask=[F, T, T, T])], spec(True))
  with pytest.raises(ValueError, match=r"example 0: text_mask must hold bools"):
    pack_examples([Example([BOS, EOS], text_mask=[0.5, 1.0])], spec())


def test_shorter_rows_train_the_same_examples_to_the_same_loss_and_gradients():
  """The same examples in rows cut to the longest of them (the paper's 288
  columns in place of 512, here the tiny ImageNet model's 80 in place of 96): the
  padding is masked out, so the step's loss and every gradient are unchanged."""
  import jax

  from monoformer_jax.config import config_file
  from monoformer_jax.data import prompts
  from monoformer_jax.diffusion.gaussian import from_config
  from monoformer_jax.layout import HOST_KEYS, row_spec, useful_work
  from monoformer_jax.model.build import abstract_model, init_params
  from monoformer_jax.train.step import make_loss_fn

  config = config_file("imagenet256:tiny")
  config.loss.text_on_image_examples = True  # the prompts train text too: both terms count
  rng = np.random.default_rng(0)
  names = ["tench", "American Staffordshire terrier", "ox", "sulphur-crested cockatoo"]
  examples = [
    prompts.image_example(
      prompts.training_prompt(names[i % 4], rng, 0.25),
      rng.normal(size=(8, 8, 4)).astype(np.float32),
      TOK,
    )
    for i in range(8)
  ]
  graphdef, _, _ = abstract_model(config.model)
  params = init_params(config.model, 0)
  grad_fn = jax.jit(
    jax.value_and_grad(make_loss_fn(graphdef, from_config(config.diffusion), config), has_aux=True)
  )
  results, padding = [], []
  for seq_len in (96, 80):
    config.data.seq_len = seq_len
    batch = pack_examples(examples, row_spec(config, TOK))  # one image per row: 8 rows
    batch = {k: v for k, v in batch.items() if k not in HOST_KEYS}  # what the devices get
    assert batch["tokens"].shape == (8, seq_len)
    padding.append(1 - useful_work(batch["segment_ids"])[0] / batch["tokens"].size)
    results.append(grad_fn(params, batch, jax.random.PRNGKey(1)))
  (old_loss, old_metrics), old_grads = results[0]
  (new_loss, new_metrics), new_grads = results[1]
  assert padding[1] < padding[0] and float(old_metrics["text_tokens"]) > 0
  np.testing.assert_allclose(new_loss, old_loss, rtol=1e-6)
  for key in ("lm", "diff", "mse", "vb", "images", "text_tokens"):
    np.testing.assert_allclose(new_metrics[key], old_metrics[key], rtol=1e-6, err_msg=key)
  for path, new, old in zip(
    jax.tree_util.tree_flatten_with_path(new_grads)[0],
    jax.tree.leaves(new_grads),
    jax.tree.leaves(old_grads),
  ):
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-7, err_msg=str(path[0]))


def test_useful_work_counts_the_examples_columns_and_their_pairs():
  from monoformer_jax.layout import useful_work

  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32)
  assert useful_work(seg) == (3 + 2 + 6, 9 + 4 + 36)
  assert useful_work(np.zeros((2, 4), np.int32)) == (0, 0)
