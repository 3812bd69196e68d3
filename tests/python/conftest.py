"""Starts `oxtune deploy` on the demo model (models/SmolLM2-135M-Instruct, from
scripts/fetch-demo-model.sh) on a free 127.0.0.1 port, once for the whole session.

OXTUNE_BIN names the binary (default: target/debug/oxtune, built by scripts/test.sh)."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SERVED = "smollm2-demo"
KEY = "sk-python-tests"


@pytest.fixture(scope="session")
def server():
    binary = Path(os.environ.get("OXTUNE_BIN", ROOT / "target" / "debug" / "oxtune"))
    if not MODEL.is_dir():
        pytest.fail(f"{MODEL} is missing: run scripts/fetch-demo-model.sh first")
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: run cargo build -p oxtune first")
    process = subprocess.Popen(
        [str(binary), "deploy", "--model", str(MODEL), "--device", "cpu", "--port", "0",
         "--served_model_name", SERVED, "--api_key", KEY, "--max_concurrent_requests", "4",
         "--shutdown_timeout", "0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "info"},
    )
    lines = []
    ready = threading.Event()
    address = {}

    def read():
        for line in process.stderr:
            lines.append(line)
            found = re.search(r"ready: http://([^/\s]+)/v1", line)
            if found:
                address["value"] = found.group(1)
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout=300):
        process.kill()
        pytest.fail("oxtune deploy did not become ready:\n" + "".join(lines))
    port = address["value"].rsplit(":", 1)[1]
    yield {"port": port, "key": KEY, "model": SERVED, "log": lines}
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("oxtune deploy did not exit after SIGTERM")
    assert KEY not in "".join(lines), "the API key leaked into the log"
