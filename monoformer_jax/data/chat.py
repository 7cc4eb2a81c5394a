"""Chats and plain texts as training examples, the loss on the assistant's turns.

A conversation is a list of turns {"role": "user" | "assistant" | "system",
"content": str}. `render_chat` turns it into token ids under a named template
(`CHAT_TEMPLATES`) and a mask, one bool per id, True where the token is a
cross-entropy target; `chat_example` wraps both in a packing `Example`
(`text_mask`), so `text_weights[l]` is 1 exactly where token l + 1 is masked in.
Ids open with bos and close with eos, as every text example does (prompts.py).

What the reference (github.com/MonoFormer/MonoFormer) does with UltraChat:
its data/dataset.py only lists the .jsonl files and hands each line to an item
processor in train.py, which reads {"data": [user, assistant, ...]} and keeps a
single pair, the LAST user text and the LAST assistant text (multi-turn is
marked unsupported there). Its chat template (the config's `chat_template`,
the same string as infer_llm.py's default) writes every user message as bos,
"### Human: " and the content stripped of surrounding whitespace, and every
assistant message as "### Assistant: ", the content as it is and eos: an eos
closes EVERY assistant turn, a bos opens every user turn, nothing (no newline,
no space) separates turns, and system messages are not written at all. A
generation prompt ends with "### Assistant: ". Its `train_on_source` is set
to `not apply_chat_template`: with the template, the rendered string is cut
before each "### Assistant:" and the loss covers that prefix, the answer and
its eos, not the user side; without it, the example is bos + input + output +
eos with no role markers and the loss covers every token. The shipped configs
set `use_chat_template = False` and train.py reads `apply_chat_template`,
which none sets, so UltraChat was in fact trained the second way.

Our templates:
  "human_assistant"  the reference's template above, every turn kept (a system
                     turn is written "### System: " + content instead of being
                     dropped); the role prefixes are never targets (the
                     reference trains "### Assistant: ", which a prompt always
                     supplies at inference).
  "plain"            the contents joined by newlines, no role markers.
  "concat"           the contents back to back: with train_on_source=True and
                     one user/assistant pair, the reference's trained format
                     (bos, input, output, eos, every token a target).

Default `train_on_source=False`: loss on the assistant's turns only (their
content, the separator or eos that ends them), what the reference does
whenever its chats carry roles, and the loss on answers a chat model is
trained with (the model learns to answer, not to write the user's side). True
trains every token but the first bos (the reference's run without a template).

Each piece (bos, a role prefix, a content, a separator, eos) is tokenized on
its own so the mask's edges are token edges. A byte tokenizer gives the same
ids as the whole string; SentencePiece puts its "▁" in front of each piece, as
the reference's separate source/target tokenization does at its one cut.

The readers (`input_files`, `read_conversations`, `read_texts`) only parse and
check files, for the chat and text sources (data/sources/); rendering happens at
training time from the stored turns.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from etils import epath

from monoformer_jax.data import prompts
from monoformer_jax.data.jsonl import json_objects, numbered_lines
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError, PathError
from monoformer_jax.layout import Example

ROLES = ("user", "assistant", "system")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How turns become text: a prefix per role, what separates turns, and where
  bos/eos go besides the start and the end."""

  prefixes: Mapping[str, str]  # role -> text before its content
  separator: str = ""  # between two turns; part of the turn it ends
  bos_before_user: bool = False  # a bos opens every user turn
  eos_after_assistant: bool = False  # an eos closes every assistant turn
  strip_user: bool = False  # user content without surrounding whitespace


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
  "human_assistant": ChatTemplate(
    prefixes={"user": "### Human: ", "assistant": "### Assistant: ", "system": "### System: "},
    bos_before_user=True,
    eos_after_assistant=True,
    strip_user=True,
  ),
  "plain": ChatTemplate(prefixes={r: "" for r in ROLES}, separator="\n"),
  "concat": ChatTemplate(prefixes={r: "" for r in ROLES}),
}


def chat_template(name: str) -> ChatTemplate:
  """The template called `name`; raises naming the known ones."""
  if name not in CHAT_TEMPLATES:
    raise ConfigError(f"chat template {name!r} is not known; use one of {sorted(CHAT_TEMPLATES)}")
  return CHAT_TEMPLATES[name]


def _check_turns(turns: Sequence[Mapping[str, Any]]) -> None:
  if not turns:
    raise ValueError("a conversation needs at least one turn")
  for k, turn in enumerate(turns):
    role = turn.get("role") if isinstance(turn, Mapping) else None
    if role not in ROLES or not isinstance(turn.get("content"), str):
      raise ValueError(
        f"turn {k} is {turn!r}; each turn must be {{'role': one of "
        f"{list(ROLES)}, 'content': a str}}"
      )


def render_chat(
  turns: Sequence[Mapping[str, str]],
  tokenizer,
  template: str = "human_assistant",
  train_on_source: bool = False,
) -> tuple[list[int], list[bool]]:
  """(ids, mask) of a conversation: mask True on the targets (see the module
  docstring): the assistant turns, or with `train_on_source` all but bos."""
  _check_turns(turns)
  tpl = chat_template(template)
  bos, eos = tokenizer.bos_id, tokenizer.eos_id
  ids: list[int] = []
  mask: list[bool] = []

  def add(piece_ids, trained: bool):
    ids.extend(piece_ids)
    mask.extend([trained] * len(piece_ids))

  last = len(turns) - 1
  for k, turn in enumerate(turns):
    role, content = turn["role"], turn["content"]
    answer = role == "assistant"
    if k == 0 or (role == "user" and tpl.bos_before_user):
      add([bos], False)
    if role == "user" and tpl.strip_user:
      content = content.strip()
    add(tokenizer.encode(tpl.prefixes[role]) if tpl.prefixes[role] else [], False)
    add(tokenizer.encode(content) if content else [], answer)
    if answer and tpl.eos_after_assistant:
      add([eos], True)
    if k < last and tpl.separator:
      add(tokenizer.encode(tpl.separator), answer)
  if not (turns[last]["role"] == "assistant" and tpl.eos_after_assistant):
    add([eos], turns[last]["role"] == "assistant")
  if train_on_source:
    mask = [False] + [True] * (len(ids) - 1)
  return ids, mask


def chat_example(
  turns: Sequence[Mapping[str, str]],
  tokenizer,
  template: str = "human_assistant",
  train_on_source: bool = False,
) -> Example:
  """A text-only training example of a conversation, its loss where
  `render_chat`'s mask says."""
  ids, mask = render_chat(turns, tokenizer, template, train_on_source)
  return Example(ids, (), train_text=True, text_mask=mask)


def text_example(text: str, tokenizer) -> Example:
  """A plain text <s> text </s>, every token a target."""
  return Example(prompts.text_ids(text, tokenizer), (), train_text=True)


# ----------------------------------------------------------------------------- readers


def _checked_file(path) -> str:
  path = os.fspath(path)
  if not epath.Path(path).exists():
    raise MissingPathError(f"{path} does not exist; give the path of a data file")
  if epath.Path(path).is_dir():
    raise PathError(f"{path} is a folder; give the path of one data file in it")
  return path


def input_files(path) -> list[str]:
  """The .jsonl and .txt files of the folder `path` (--input_dir), sorted, or
  the one file it names; local or on a bucket (`gs://...`)."""
  path = os.fspath(path)
  where = epath.Path(path)
  if where.is_dir():
    found = sorted(
      os.path.join(path, f.name)
      for pattern in ("*.jsonl", "*.txt")
      for f in where.glob(pattern)
      if not f.name.startswith(".")  # as glob.glob: "*" matches no hidden name
    )
    if not found:
      raise MissingPathError(f"--input_dir={path!r} holds no .jsonl or .txt files")
    return found
  if not where.exists():
    raise MissingPathError(f"--input_dir={path!r} does not exist")
  return [path]


_CHAT_KEYS = ("data", "messages", "conversations")


def _turns_of(record: dict) -> list[dict[str, str]]:
  """The normalised turns of one JSONL record; ValueError says what is wrong."""
  keys = [k for k in _CHAT_KEYS if k in record]
  if len(keys) != 1:
    raise ValueError(f"has keys {sorted(record)}; give exactly one of {list(_CHAT_KEYS)}")
  key = keys[0]
  items = record[key]
  if not isinstance(items, list) or not items:
    raise ValueError(f"{key!r} must be a non-empty list, got {items!r:.80}")
  turns = []
  for k, item in enumerate(items):
    if key == "data":
      role, content = ("user", "assistant")[k % 2], item
    elif key == "messages":
      if not isinstance(item, dict):
        raise ValueError(f"messages[{k}] is {item!r:.80}, not {{'role', 'content'}}")
      role, content = item.get("role"), item.get("content")
      if role not in ROLES:
        raise ValueError(f"messages[{k}] has role {role!r}; use one of {list(ROLES)}")
    else:
      if not isinstance(item, dict):
        raise ValueError(f"conversations[{k}] is {item!r:.80}, not {{'from', 'value'}}")
      who, content = item.get("from"), item.get("value")
      if who not in SHAREGPT_ROLES:
        raise ValueError(f"conversations[{k}] is from {who!r}; use one of {list(SHAREGPT_ROLES)}")
      role = SHAREGPT_ROLES[who]
    if not isinstance(content, str):
      raise ValueError(f"{key}[{k}] has content {content!r:.80}, not a str")
    turns.append({"role": role, "content": content})
  return turns


def read_conversations(path) -> Iterator[list[dict[str, str]]]:
  """The conversations of a JSONL file, each as turns {"role", "content"}.

  A line is {"data": [user, assistant, user, ...]} (UltraChat: alternating,
  the user first), {"messages": [{"role", "content"}, ...]}, or ShareGPT's
  {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]};
  blank lines are skipped. A missing file raises now; a bad line or a file
  without conversations raises when reached, naming the file and line.
  """
  path = _checked_file(path)

  def conversations():
    count = 0
    for number, record in json_objects(path):
      try:
        turns = _turns_of(record)
      except ValueError as e:
        raise FileFormatError(f"{path}, line {number}: {e}") from None
      count += 1
      yield turns
    if not count:
      raise FileFormatError(
        f"{path} holds no conversations (it is empty or blank); give a "
        "JSONL file with one conversation per line"
      )

  return conversations()


def read_texts(path) -> Iterator[str]:
  """The documents of a file: a .jsonl of {"text": str} per line (blank lines
  skipped), or a .txt whose documents are separated by blank lines (the lines
  of one document joined by newlines). Errors as `read_conversations`."""
  path = _checked_file(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in (".jsonl", ".txt"):
    raise FileFormatError(
      f"{path}: texts are read from a .jsonl ({{'text': ...}} per line) "
      "or a .txt (blank lines between documents), not "
      f"{suffix or 'no suffix'!r}"
    )

  def jsonl():
    for number, record in json_objects(path):
      text = record.get("text")
      if not isinstance(text, str):
        raise FileFormatError(
          f"{path}, line {number}: 'text' is {text!r:.80}; each line must be {{\"text\": a str}}"
        )
      yield text

  def txt():
    lines: list[str] = []
    for _, line in numbered_lines(path):
      if line.strip():
        lines.append(line)
      elif lines:
        yield "\n".join(lines)
        lines = []
    if lines:
      yield "\n".join(lines)

  def documents():
    count = 0
    for text in jsonl() if suffix == ".jsonl" else txt():
      count += 1
      yield text
    if not count:
      raise FileFormatError(
        f"{path} holds no texts (it is empty or blank); give a .jsonl of "
        '{"text": ...} lines or a .txt of documents'
      )

  return documents()
