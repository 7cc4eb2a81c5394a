"""Chat: conversations trained with the loss on the assistant's answers.

    python -m monoformer_jax.data.prepare chat --input_dir=FILE.jsonl --output_dir=OUT

--input_dir is a JSONL file or a folder of them: UltraChat's `data`, or
`messages` / ShareGPT's `conversations` per line (data/chat.py reads them). A
record is `turns`, the conversation as JSON [{role, content}, ...], rendered
at training time with data.chat_template (data.train_on_source: the loss on
the user's turns too).
"""

from __future__ import annotations

import json

from monoformer_jax.data import chat, pipeline
from monoformer_jax.data.sources import DataSource, PrepareArgs, Prepared
from monoformer_jax.layout import Example


class Chat(DataSource):
  name = "chat"

  def features(self, *, latent_shape=None, flip: bool = False) -> dict:
    import tensorflow_datasets as tfds

    return dict(turns=tfds.features.Text())

  def prepare(self, args: PrepareArgs, output_dir: str) -> Prepared:
    files = chat.input_files(args.input_dir)
    records = lambda: (
      {"key": f"{i:09d}", "turns": json.dumps(turns)}
      for i, turns in enumerate(t for f in files for t in chat.read_conversations(f))
    )
    return Prepared({"train": records})

  def examples(self, config, tokenizer, seed: int, directory: str | None = None):
    template, train_on_source = config.data.chat_template, bool(config.data.train_on_source)

    def to_example(record, rng) -> Example:
      return chat.chat_example(
        json.loads(_text(record["turns"])), tokenizer, template, train_on_source
      )

    return pipeline.record_stream(self.records(config, directory), to_example, seed)


SOURCE = Chat()


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
