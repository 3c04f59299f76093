"""onnxruntime's usage telemetry stays off unless the operator turns it on (README, "Privacy")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

LOAD_A_MODEL = (
    "import os, sys, service.runtime, onnxruntime as ort; "
    "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
    "print(os.environ.get('ORT_DISABLE_TELEMETRY'))"
)


def _python(code: str, home: Path, *args: str, **env: str) -> str:
    # A bare environment: onnxruntime mutes its telemetry by itself when it sees CI variables,
    # which would hide what a user's machine does.
    bare = {"PATH": os.environ["PATH"], "HOME": str(home), **env}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=bare, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_loading_a_model_through_the_service_leaves_no_telemetry_trace(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert _python(LOAD_A_MODEL, home, str(tiny_models_dir / "fast.onnx")) == "1"
    # With telemetry on, onnxruntime writes a device id and an event queue under ~/.cache.
    assert list(home.rglob("*")) == []


def test_an_operators_own_telemetry_setting_is_kept(tmp_path: Path) -> None:
    # Importing only: no session, so nothing is sent from the test machine.
    read = "import os, service; print(os.environ.get('ORT_DISABLE_TELEMETRY'))"
    assert _python(read, tmp_path, ORT_DISABLE_TELEMETRY="0") == "0"
