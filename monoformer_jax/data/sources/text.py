"""Text: plain documents, every token a cross-entropy target.

    python -m monoformer_jax.data.prepare text --input_dir=FILE.jsonl --output_dir=OUT

--input_dir is a .jsonl of {"text": ...} lines or a .txt of documents
separated by blank lines, or a folder of them (data/chat.py reads them). A
record is `text`; its example is <s> text </s>.
"""

from __future__ import annotations

from monoformer_jax.data import chat, pipeline
from monoformer_jax.data.sources import DataSource, PrepareArgs, Prepared
from monoformer_jax.layout import Example


class Text(DataSource):
  name = "text"

  def features(self, *, latent_shape=None, flip: bool = False) -> dict:
    import tensorflow_datasets as tfds

    return dict(text=tfds.features.Text())

  def prepare(self, args: PrepareArgs, output_dir: str) -> Prepared:
    files = chat.input_files(args.input_dir)
    records = lambda: (
      {"key": f"{i:09d}", "text": text}
      for i, text in enumerate(t for f in files for t in chat.read_texts(f))
    )
    return Prepared({"train": records})

  def examples(self, config, tokenizer, seed: int, directory: str | None = None):
    def to_example(record, rng) -> Example:
      text = record["text"]
      return chat.text_example(
        text.decode("utf-8") if isinstance(text, bytes) else str(text), tokenizer
      )

    return pipeline.record_stream(self.records(config, directory), to_example, seed)


SOURCE = Text()
