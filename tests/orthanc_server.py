"""A real PACS for the tests: Orthanc (Debian's `orthanc` and `orthanc-dicomweb` packages, installed by
.ci/run) with its own temporary storage, a free HTTP port, authentication on, and stopped afterwards.
Orthanc 1.10 has no listen-address setting: it refuses every client but loopback (RemoteAccessAllowed
false), and its DICOM (DIMSE) server is off. Where it is missing the tests that need it skip (fail with
BONEAGE_REQUIRE_ORTHANC=1)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import _free_port
from system_tools import program_or_skip

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "boneage", "test-only-password"


def start(folder: Path) -> tuple[subprocess.Popen, dict]:
    """Orthanc on 127.0.0.1, storing under `folder`: (process, {"url": DICOMweb root, "auth": (user,
    password)}). Waits until it answers (30 s at most)."""
    import requests

    program = program_or_skip(("Orthanc",), "Orthanc", "BONEAGE_REQUIRE_ORTHANC",
                              "Debian/Ubuntu: apt-get install orthanc orthanc-dicomweb", "to test against a PACS")
    if not DICOMWEB_PLUGIN.exists():
        program_or_skip(("no-such-program",), "Orthanc DICOMweb plug-in", "BONEAGE_REQUIRE_ORTHANC",
                        "Debian/Ubuntu: apt-get install orthanc-dicomweb", f"({DICOMWEB_PLUGIN})")
    http = _free_port()
    config = {"Name": "boneage-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
              "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([program, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{base}/system", auth=(USER, PASSWORD), timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return process, {"url": f"{base}/dicom-web", "base": base, "auth": (USER, PASSWORD)}


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
