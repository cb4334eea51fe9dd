"""The OpenAPI document stays what existing clients were built against.

`openapi.snapshot.json` is /api/schema as it stood before the house was restructured
(issue 24). Paths, operations, parameters, fields, types, enums, bounds and responses must
stay equal; only human-readable text (descriptions, summaries, titles) may improve. A
change meant to alter the contract updates the snapshot in the same commit:
`bin/manage spectacular --format openapi-json --file tests/sdxl_service/api/openapi.snapshot.json`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.processes import REPO

SNAPSHOT = Path(__file__).with_name("openapi.snapshot.json")
# Words for people, not for clients: free to improve.
PROSE_KEYS = {"description", "summary", "title"}


def _without_prose(node):
    if isinstance(node, dict):
        return {key: _without_prose(value) for key, value in node.items() if key not in PROSE_KEYS}
    if isinstance(node, list):
        return [_without_prose(item) for item in node]
    return node


def test_schema_equals_the_snapshot_but_for_prose(tmp_path):
    # In a fresh process with the default limits: the request serializers read their bounds
    # from settings when first imported, so in this process a test that changed a limit
    # before that import would change the document.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}
    document = subprocess.run(
        [sys.executable, "manage.py", "spectacular", "--format", "openapi-json"],
        cwd=REPO,
        env={**environment, "SDXL_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert _without_prose(json.loads(document)) == _without_prose(snapshot)


def test_the_comparison_sees_a_changed_field():
    document = {"paths": {"/x": {"post": {"description": "a", "parameters": [{"in": "query"}]}}}}
    reworded = {"paths": {"/x": {"post": {"description": "b", "parameters": [{"in": "query"}]}}}}
    changed = {"paths": {"/x": {"post": {"description": "a", "parameters": [{"in": "path"}]}}}}
    assert _without_prose(document) == _without_prose(reworded)
    assert _without_prose(document) != _without_prose(changed)
