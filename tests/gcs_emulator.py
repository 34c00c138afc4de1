"""A local Google Cloud Storage for tests: gcp-storage-emulator, plus the generation headers
that real GCS sends with every object download and that tensorstore (Orbax's array store)
requires to read an OCDBT manifest back ("Malformed StorageGeneration" without them).

    python tests/gcs_emulator.py PORT BUCKET      # serves http://localhost:PORT, BUCKET in memory
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the emulator's own handler answers 404
        obj = None
    if obj is not None:
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # before the server's routing table captures it

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    port, bucket = sys.argv[1:3]
    sys.exit(main(["start", "--port", port, "--in-memory", "--default-bucket", bucket]))
