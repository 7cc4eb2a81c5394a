"""Runs `python -m MODULE ARGS` (an entry point) with the cloud storage
clients' retry budgets cut from minutes to about a second, for tests that
stop the storage server mid-run: TensorStore (Orbax's arrays; by default 32
retries up to 32 s apart), gcsfs (6, up to 16 s apart) and
google-cloud-storage (120 s). The clients' behaviour is otherwise theirs.

    python tests/short_retries.py monoformer_jax.train --config=... --workdir=gs://...
"""

import asyncio
import runpy
import sys


def _shorten():
  import gcsfs.retry
  from google.cloud.storage import retry as storage_retry
  from orbax.checkpoint._src.serialization import tensorstore_utils

  quick = {"max_retries": 2, "initial_delay": "0.05s", "max_delay": "0.1s"}
  for context in (tensorstore_utils._BASE_TS_CONTEXT, tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):
    context["gcs_request_retries"] = quick

  class _QuickAsyncio:  # gcsfs.retry sleeps through its module's `asyncio`
    def __getattr__(self, name):
      return getattr(asyncio, name)

    @staticmethod
    async def sleep(seconds):
      await asyncio.sleep(min(seconds, 0.05))

  gcsfs.retry.asyncio = _QuickAsyncio()
  # Every default policy of the client wraps this one object.
  policy = storage_retry.DEFAULT_RETRY
  policy._initial, policy._maximum, policy._timeout, policy._deadline = 0.05, 0.1, 1.0, 1.0


if __name__ == "__main__":
  _shorten()
  module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
