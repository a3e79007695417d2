"""A Google Cloud Storage emulator on 127.0.0.1 for the gs:// workdir tests, and the environment
that points both gs:// clients at it.

The server is gcp-storage-emulator's request handler and in-memory store (the GCS JSON API),
served on a free loopback port from a child process (`python tests/gcs_emulator.py LOG`). The
child ends when its parent closes its stdin (the fixture's teardown, or the parent dying) or
after MAX_SECONDS, whichever comes first; every request is logged to LOG.

Two clients read and write gs:// here, and each has its own way to a GCS endpoint:
  tensorstore (Orbax's arrays)  TENSORSTORE_GCS_HTTP_URL (the endpoint) and
                                GOOGLE_AUTH_TOKEN_FOR_TESTING (no credential lookup);
  gcsfs (etils.epath's gs://    STORAGE_EMULATOR_HOST (the endpoint) and FSSPEC_GCS_TOKEN=anon
  backend without TensorFlow)   (fsspec's per-protocol default: no credential lookup);
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs's plain GCSFileSystem: its default
subclass first asks the Storage Control gRPC API for the bucket type, which the emulator does
not serve (a 60 s timeout per call). The GCE metadata variables point at a closed loopback port
so that no credential fallback can reach beyond this machine.

Three answers the emulator (2026.7.19) does not give as GCS does are completed here, in the
child only (`_complete_emulator`), each measured:
  - a media GET carries no x-goog-generation header: tensorstore then records generation 0,
    and its next conditional write of that object (OCDBT's manifest.ocdbt, read back while a
    checkpoint is written) fails with "Malformed StorageGeneration";
  - objects.move (POST .../o/SRC/moveTo/o/DST, what gcsfs renames with) is answered 501, which
    gcsfs retries with back-off (1 + 2 + 4 + 8 + 16 s) before it copies and deletes instead;
  - listings ignore startOffset/endOffset, which tensorstore's kvstore listing sends instead
    of a prefix: it gets other keys and aborts the process (std::out_of_range).
Still unlike GCS, and harmless with one writer per run: the ifGenerationMatch /
ifGenerationNotMatch preconditions are not enforced (a conditional write always succeeds).
The child's stdout and stderr go to LOG after its first line: socketserver prints a traceback
there for each response a client stopped reading (gcsfs cancels the slower of two lookups).
"""
import functools
import http.server
import json
import logging
import os
import select
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

MAX_SECONDS = 900.0
HOST = "127.0.0.1"


def client_env(url: str) -> dict[str, str]:
  """Environment variables that send tensorstore's and gcsfs's gs:// requests to `url`."""
  closed = f"{HOST}:9"  # nothing listens there: any metadata-server probe fails at once
  return {"TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
          "STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
          "GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "GCE_METADATA_ROOT": closed}


class GcsEmulator:
  """The emulator child process; `stop()` ends it (bounded: terminate, then kill)."""

  def __init__(self, log_path, start_timeout: float = 60.0):
    self.log_path = os.fspath(log_path)
    # Only the first line comes through a pipe (nobody reads it later: a full pipe would stall
    # the server); then the child's stdout and stderr (handler tracebacks) go to the log.
    with open(self.log_path, "ab") as log:
      self._proc = subprocess.Popen([sys.executable, __file__, self.log_path], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, text=True)
    ready, _, _ = select.select([self._proc.stdout], [], [], start_timeout)
    line = self._proc.stdout.readline() if ready else ""
    self._proc.stdout.close()
    if not line.startswith("PORT "):
      self.stop()
      raise RuntimeError(f"the GCS emulator did not start within {start_timeout} s: {line!r} "
                         f"(see {self.log_path})")
    self.url = f"http://{HOST}:{int(line.split()[1])}"
    self.env = client_env(self.url)

  def _request(self, method: str, path: str, data: bytes = None,
               content_type: str = "application/json") -> bytes:
    request = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.read()

  @staticmethod
  def _object_path(bucket: str, name: str) -> str:
    return f"/storage/v1/b/{urllib.parse.quote(bucket)}/o/{urllib.parse.quote(name, safe='')}"

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b", json.dumps({"name": name}).encode())

  def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
    """Every object name in `bucket` under `prefix`, sorted: what GCS holds, asked of the
    emulator directly (no client cache in between)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    listing = json.loads(self._request("GET", f"/storage/v1/b/{urllib.parse.quote(bucket)}/o?{query}"))
    return sorted(item["name"] for item in listing.get("items") or [])

  def read_object(self, bucket: str, name: str) -> bytes:
    return self._request("GET", self._object_path(bucket, name) + "?alt=media")

  def write_object(self, bucket: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._request("POST", f"/upload/storage/v1/b/{urllib.parse.quote(bucket)}/o?{query}", data,
                  "application/octet-stream")

  def delete_object(self, bucket: str, name: str) -> None:
    self._request("DELETE", self._object_path(bucket, name))

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()  # the child's signal to shut down
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait(timeout=10)


def _complete_emulator() -> None:
  """Adds the three GCS answers the module docstring names to the emulator's routing."""
  from http import HTTPStatus

  from gcp_storage_emulator import server, settings
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  plain_download, plain_list = objects.download, objects.ls

  def download(request, response, storage, *args, **kwargs):
    plain_download(request, response, storage)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  def move(request, response, storage, *args, **kwargs):
    bucket, source = request.params["bucket_name"], request.params["object_id"]
    try:
      moved = objects._copy(request.base_url, storage, bucket, source, bucket,
                            request.params["dest_object_id"])
      storage.delete_file(bucket, source)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    response.json(moved)

  def list_objects(request, response, storage, *args, **kwargs):
    plain_list(request, response, storage)
    first, end = (request.query.get(k, [None])[0] for k in ("startOffset", "endOffset"))
    if response.status == HTTPStatus.OK and (first or end):
      listing = json.loads(response._content)
      listing["items"] = [item for item in listing["items"] if (not first or item["name"] >= first)
                          and (not end or item["name"] < end)]
      response.json(listing)

  objects.download = download  # objects.get (alt=media) looks it up at call time
  move_route = (rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
                rf"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {"POST": move})
  server.HANDLERS = (move_route,) + tuple(
      (pattern, {method: {plain_download: download, plain_list: list_objects}.get(handler, handler)
                 for method, handler in handlers.items()})
      for pattern, handlers in server.HANDLERS)


def _serve(log_path: str) -> None:
  from gcp_storage_emulator.server import RequestHandler
  from gcp_storage_emulator.storage import Storage
  logging.basicConfig(filename=log_path, level=logging.INFO, format="%(levelname)s %(message)s")
  _complete_emulator()
  server = http.server.HTTPServer((HOST, 0), functools.partial(RequestHandler, Storage(use_memory_fs=True)))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  print(f"PORT {server.server_address[1]}", flush=True)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  stdin_closed = threading.Thread(target=sys.stdin.read, daemon=True)
  stdin_closed.start()
  stdin_closed.join(MAX_SECONDS)
  server.shutdown()
  server.server_close()


if __name__ == "__main__":
  _serve(sys.argv[1])
