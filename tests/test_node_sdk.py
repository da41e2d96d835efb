"""The official openai Node SDK as the client (tests/node/sdk.mjs), at the version
tests/node/package.json pins; `make test` installs it into tests/node/node_modules."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.gateway import TEAM_A, Gateway

NODE = Path(__file__).resolve().parent / "node"


def test_request_ids_and_models_retrieve(gateway: Gateway) -> None:
    assert (NODE / "node_modules" / "openai").is_dir(), "the Node SDK is missing: run `make test` (it installs it)"
    run = subprocess.run(["node", str(NODE / "sdk.mjs"), gateway.url + "/v1"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "AISIX_KEY": TEAM_A, "AISIX_WRONG_KEY": "sk-wrong"})
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)

    speech = seen["speech"]
    assert speech["bytes"] == 3 * 4800
    assert speech["request_id"] == speech["header"] and len(speech["request_id"]) == 32
    assert gateway.event(speech["request_id"])["status"] == 200

    assert seen["retrieve"]["model"] == {"id": "tts-prod", "object": "model", "created": 0, "owned_by": "openai"}
    assert seen["retrieve"]["request_id"]
    assert seen["listed"] == ["tts-prod", "whisper-prod"]

    wrong = seen["wrong_key"]
    assert (wrong["status"], wrong["code"], wrong["param"]) == (401, "invalid_api_key", None)
    assert wrong["request_id"] == wrong["header"]
    assert gateway.event(wrong["request_id"])["error_code"] == "invalid_api_key"

    unknown = seen["unknown_model"]
    assert (unknown["status"], unknown["code"], unknown["param"]) == (404, "model_not_found", None)
    assert unknown["request_id"] == unknown["header"]
