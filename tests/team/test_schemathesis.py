"""`schemathesis run` over our own OpenAPI document, bounded in time: no 5xx on any operation,
every status documented, every error in its route family's envelope (the schemas the route
classes in routes/common/families.py declare), content types as documented."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, settings_for

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MAX_SECONDS = 45
# A CPython 3.11 bug in the AST recursion-depth check can raise this inside schemathesis' own
# generator (seen once here on 3.11.7); it is the tool crashing, so the whole run is repeated.
CPYTHON_AST_BUG = "AST constructor recursion depth mismatch"
# Hypothesis' own engine can crash too: 6.170.17's target() hill climb indexed past the spans of a
# shorter attempt (IndexError in optimiser.attempt_replace, seen once in CI). Schemathesis reports
# such a crash as a "Runtime Error" whose traceback ends inside hypothesis' engine.
ENGINE_FRAME = re.compile(r'File "[^"]*/site-packages/hypothesis/internal/[^"]*"')
TOOL_RUNS = 3


def tool_crashed(report: str) -> bool:
    """True when the run found nothing about our API and only the tool itself failed: no
    failed check, and every error block a crash inside CPython's AST check or hypothesis' engine.
    A network error, a timeout or a check's failure is a finding and is never retried."""
    if "= FAILURES =" in report:
        return False
    if CPYTHON_AST_BUG in report:
        return True
    if "= ERRORS =" not in report:
        return False
    errors = report.split("= ERRORS =", 1)[1].split("= WARNINGS =", 1)[0]
    blocks = re.split(r"\n_{5,} .+ _{5,}\n", errors)[1:]
    return bool(blocks) and all(_engine_crash(block) for block in blocks)


def _engine_crash(block: str) -> bool:
    frames = re.findall(r'File "[^"]*"', block)
    return block.lstrip().startswith("Runtime Error") and bool(frames) and bool(ENGINE_FRAME.match(frames[-1]))


def test_openapi_document_holds(tmp_path: Path) -> None:
    binary = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    settings = settings_for(FAKE_MODELS, api_keys=["st-key"], key_db=str(tmp_path / "keys.db"))
    with LiveServer(settings) as server:
        server.wait_ready()
        cmd = [
            binary, "run", f"{server.url}/openapi.json",
            "--header", "Authorization: Bearer st-key",
            "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing",
            "--max-time", str(MAX_SECONDS),
            "--workers", "2",
            "--suppress-health-check", "all",
            "--request-timeout", "10",
        ]  # fmt: skip
        for _ in range(TOOL_RUNS):  # each run draws a new seed
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=MAX_SECONDS + 60)
            if not tool_crashed(run.stdout):
                break
    report = run.stdout[-20000:]
    assert run.returncode == 0, report
    assert " passed" in report and "generated" in report


_ENGINE_CRASH = """
==================================== ERRORS ====================================
_________________________ DELETE /admin/models/{name} __________________________
Runtime Error

Index 24 out of range [-24, 24)

    Traceback (most recent call last):
      File "/v/lib/python3.11/site-packages/schemathesis/engine/run/unit/_hypothesis_executor.py", line 51, in run_test
      File "/v/lib/python3.11/site-packages/hypothesis/internal/conjecture/optimiser.py", line 185, in attempt_replace
      File "/v/lib/python3.11/site-packages/hypothesis/internal/conjecture/data.py", line 579, in __getitem__
    IndexError: Index 24 out of range [-24, 24)

=================================== WARNINGS ===================================
"""
_NETWORK_ERROR = """
==================================== ERRORS ====================================
___________________________ POST /v1/chat/completions ___________________________
Network Error

Connection failed

    Traceback (most recent call last):
      File "/v/lib/python3.11/site-packages/urllib3/connectionpool.py", line 787, in urlopen
    ConnectionResetError: [Errno 104] Connection reset by peer
"""


def test_only_the_tools_own_crashes_are_retried() -> None:
    assert tool_crashed(_ENGINE_CRASH)
    assert tool_crashed("... " + CPYTHON_AST_BUG + " ...")
    assert not tool_crashed(_NETWORK_ERROR)
    both = _ENGINE_CRASH.replace("=" * 35 + " WARNINGS", _NETWORK_ERROR.split("=\n", 2)[-1] + "=" * 35 + " WARNINGS")
    assert "Network Error" in both.split("WARNINGS")[0]
    assert not tool_crashed(both)
    failed = "=================================== FAILURES ===================================\n" + _ENGINE_CRASH
    assert not tool_crashed(failed)
    assert not tool_crashed("Test cases:\n  5428 generated, 5428 passed\n")
