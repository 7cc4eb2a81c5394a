"""Chats and texts as examples: the templates token by token, the loss mask,
the three conversation formats, text files, file errors, and a packed chat."""

import json
import re

import numpy as np
import pytest

from monoformer_jax.data.chat import (
  CHAT_TEMPLATES,
  chat_example,
  read_conversations,
  read_texts,
  render_chat,
  text_example,
)
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError, PathError
from monoformer_jax.layout import RowSpec
from monoformer_jax.text.tokenizer import load_tokenizer

TOK = load_tokenizer("bytes")
BOS, EOS = TOK.bos_id, TOK.eos_id
F, T = False, True

TURNS = [
  {"role": "user", "content": " Hi there \n"},
  {"role": "assistant", "content": "Hello!"},
  {"role": "user", "content": "Bye"},
  {"role": "assistant", "content": "Ciao."},
]


def pieces(*parts):
  """(ids, mask) of hand-written parts: (text or a special id, trained)."""
  ids, mask = [], []
  for part, trained in parts:
    part_ids = [part] if isinstance(part, int) else TOK.encode(part)
    ids += part_ids
    mask += [trained] * len(part_ids)
  return ids, mask


def test_human_assistant_is_the_references_template():
  ids, mask = render_chat(TURNS, TOK)
  # bos before every user turn (its content stripped), eos after every answer,
  # nothing between turns; only the answers and their eos are targets.
  assert TOK.decode(ids) == (
    "### Human: Hi there### Assistant: Hello!### Human: Bye### Assistant: Ciao."
  )
  want = pieces(
    (BOS, F),
    ("### Human: Hi there", F),
    ("### Assistant: ", F),
    ("Hello!", T),
    (EOS, T),
    (BOS, F),
    ("### Human: Bye", F),
    ("### Assistant: ", F),
    ("Ciao.", T),
    (EOS, T),
  )
  assert (ids, mask) == want
  assert ids[0] == BOS and ids[-1] == EOS and len(mask) == len(ids)


def test_train_on_source_trains_all_but_the_first_bos():
  ids, mask = render_chat(TURNS, TOK, train_on_source=True)
  assert ids == render_chat(TURNS, TOK)[0]
  assert mask == [F] + [T] * (len(ids) - 1)


def test_system_turn_and_a_last_user_turn_never_train():
  turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert render_chat(turns, TOK) == pieces(
    (BOS, F), ("### System: Be brief.", F), (BOS, F), ("### Human: Hi", F), (EOS, F)
  )


def test_plain_and_concat_templates():
  turns = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"},
  ]
  ids, mask = render_chat(turns, TOK, template="plain")
  assert TOK.decode(ids) == "S\na\nb\nc"
  # The newline that ends an answer is the answer's; the eos after a user turn is not.
  assert (ids, mask) == pieces(
    (BOS, F), ("S", F), ("\n", F), ("a", F), ("\n", F), ("b", T), ("\n", T), ("c", F), (EOS, F)
  )
  pair = turns[1:3]
  assert render_chat(pair, TOK, template="plain") == pieces(
    (BOS, F), ("a", F), ("\n", F), ("b", T), (EOS, T)
  )
  # The reference's template-less run: <s> input output </s>, every token trained.
  ids, mask = render_chat(pair, TOK, template="concat", train_on_source=True)
  assert ids == [BOS] + TOK.encode("ab") + [EOS] and mask == [F, T, T, T]


def test_bad_turns_and_templates_raise():
  with pytest.raises(
    ConfigError,
    match=r"chat template 'chatml' is not known; use one of "
    r"\['concat', 'human_assistant', 'plain'\]",
  ):
    render_chat(TURNS, TOK, template="chatml")
  with pytest.raises(ValueError, match=r"turn 1 is .*'bot'.*each turn must be"):
    render_chat([TURNS[0], {"role": "bot", "content": "x"}], TOK)
  with pytest.raises(ValueError, match="at least one turn"):
    render_chat([], TOK)
  assert set(CHAT_TEMPLATES) == {"human_assistant", "plain", "concat"}


def test_examples():
  example = chat_example(TURNS, TOK)
  assert (list(example.ids), list(example.text_mask)) == render_chat(TURNS, TOK)
  assert example.train_text and not example.images
  plain = text_example("hi", TOK)
  assert list(plain.ids) == [BOS] + TOK.encode("hi") + [EOS] and plain.text_mask is None


def test_packed_chat_trains_exactly_the_answer():
  turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
  spec = RowSpec(
    seq_len=48,
    max_images=0,
    image_shape=(2, 2, 1),
    tokens_per_image=1,
    image_id=TOK.image_id,
    pad_id=TOK.pad_id,
  )
  batch = pack_examples([chat_example(turns, TOK), text_example("ab", TOK)], spec)
  # Columns: 0 bos, 1-13 "### Human: Hi", 14-28 "### Assistant: ", 29-30 "Yo",
  # 31 eos; then the text 32 bos, 33-34 "ab", 35 eos. The weight at l trains
  # token l + 1: "Yo" and its eos from 28-30, the whole text from 32-34.
  np.testing.assert_array_equal(np.flatnonzero(batch["text_weights"][0]), [28, 29, 30, 32, 33, 34])
  assert TOK.decode(batch["tokens"][0, 29:31]) == "Yo"
  assert batch["tokens"][0, 31] == EOS


def write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


CONVERSATION = [
  {"role": "user", "content": "What is 2+2?"},
  {"role": "assistant", "content": "4."},
  {"role": "user", "content": "And 3+3?"},
  {"role": "assistant", "content": "6."},
]


def test_three_formats_read_to_the_same_turns(tmp_path):
  texts = [t["content"] for t in CONVERSATION]
  ultrachat = {"id": "0", "data": texts}
  messages = {"messages": CONVERSATION}
  sharegpt = {
    "conversations": [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(texts)]
  }
  for name, record in [("ultrachat", ultrachat), ("messages", messages), ("sharegpt", sharegpt)]:
    path = write_lines(tmp_path / f"{name}.jsonl", [json.dumps(record), "", json.dumps(record)])
    assert list(read_conversations(path)) == [CONVERSATION, CONVERSATION], name
  system = {"conversations": [{"from": "system", "value": "Be brief."}]}
  path = write_lines(tmp_path / "system.jsonl", [json.dumps(system)])
  assert list(read_conversations(path)) == [[{"role": "system", "content": "Be brief."}]]


@pytest.mark.parametrize(
  "line,problem",
  [
    ('{"data": ["a", "b"]', r"not JSON \(.* at column \d+\)"),
    ('["a", "b"]', "a JSON list, not an object"),
    (
      '{"text": "a"}',
      r"has keys \['text'\]; give exactly one of \['data', 'messages', "
      r"'conversations'\]",
    ),
    ('{"data": ["a"], "messages": []}', r"has keys \['data', 'messages'\]; give exactly one"),
    ('{"data": []}', "'data' must be a non-empty list"),
    ('{"data": ["a", 3]}', r"data\[1\] has content 3, not a str"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', r"messages\[0\] has role 'bot'"),
    ('{"messages": ["a"]}', r"messages\[0\] is 'a', not"),
    (
      '{"conversations": [{"from": "bot", "value": "a"}]}',
      r"conversations\[0\] is from 'bot'; use one of \['human', 'gpt', 'system'\]",
    ),
  ],
)
def test_bad_conversation_lines_name_the_file_and_line(tmp_path, line, problem):
  path = write_lines(tmp_path / "chats.jsonl", ['{"data": ["a", "b"]}', line])
  with pytest.raises(FileFormatError, match=rf"{re.escape(str(path))}, line 2: {problem}"):
    list(read_conversations(path))


def test_missing_empty_and_undecodable_files(tmp_path):
  missing = tmp_path / "none.jsonl"
  with pytest.raises(MissingPathError, match=rf"{re.escape(str(missing))} does not exist"):
    read_conversations(missing)  # raised at the call, before any iteration
  with pytest.raises(MissingPathError, match=rf"{re.escape(str(missing))} does not exist"):
    read_texts(missing)
  with pytest.raises(PathError, match=rf"{re.escape(str(tmp_path))} is a folder"):
    read_conversations(tmp_path)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(FileFormatError, match=rf"{re.escape(str(empty))} holds no conversations"):
    list(read_conversations(empty))
  with pytest.raises(FileFormatError, match=rf"{re.escape(str(empty))} holds no texts"):
    list(read_texts(empty))
  blank = write_lines(tmp_path / "blank.txt", ["", "  ", ""])
  with pytest.raises(FileFormatError, match=rf"{re.escape(str(blank))} holds no texts"):
    list(read_texts(blank))
  latin = tmp_path / "latin.jsonl"
  latin.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(FileFormatError, match=rf"{re.escape(str(latin))}, line 2: not UTF-8"):
    list(read_texts(latin))


def test_read_texts(tmp_path):
  jsonl = write_lines(
    tmp_path / "texts.jsonl", ['{"text": "one\\ntwo"}', "", '{"text": "three", "id": 3}']
  )
  assert list(read_texts(jsonl)) == ["one\ntwo", "three"]
  txt = write_lines(tmp_path / "texts.txt", ["", "one", "  two", "", "", "three", "   ", "four"])
  assert list(read_texts(txt)) == ["one\n  two", "three", "four"]
  crlf = tmp_path / "crlf.txt"
  crlf.write_bytes(b"a\r\nb\r\n\r\nc")
  assert list(read_texts(crlf)) == ["a\nb", "c"]
  bad = write_lines(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"txt": "b"}'])
  with pytest.raises(FileFormatError, match=rf"{re.escape(str(bad))}, line 2: 'text' is None"):
    list(read_texts(bad))
  other = write_lines(tmp_path / "texts.csv", ["a"])
  with pytest.raises(
    FileFormatError, match=rf"{re.escape(str(other))}: texts are read from a \.jsonl"
  ):
    read_texts(other)
