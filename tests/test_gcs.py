"""gs:// paths against a real GCS-protocol server on localhost (conftest's
`gcs_server`): the three clients the project's files go through reach it
with nothing but the standard variables."""

import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def test_epath_google_cloud_storage_and_tensorstore_share_the_bucket(gcs_path):
  from google.cloud import storage

  text = epath.Path(gcs_path) / "notes" / "a.txt"
  text.parent.mkdir(parents=True, exist_ok=True)
  text.write_text("written by epath")
  bucket = storage.Client().bucket("bucket")
  name = text.as_posix().removeprefix("gs://bucket/")
  assert bucket.blob(name).download_as_text() == "written by epath"
  bucket.blob(name.replace("a.txt", "b.txt")).upload_from_string("written by storage")
  assert sorted(p.name for p in text.parent.iterdir()) == ["a.txt", "b.txt"]

  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  with ocp.CheckpointManager(
    f"{gcs_path}/ck", options=ocp.CheckpointManagerOptions(create=True)
  ) as manager:
    manager.save(3, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    assert manager.all_steps() == [3]
    np.testing.assert_array_equal(manager.restore(3)["w"], state["w"])  # arrays via TensorStore
