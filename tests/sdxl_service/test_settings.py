"""Settings as a new user meets them: the first command on a fresh data dir works."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_first_migrate_creates_the_data_dir_and_sqlite_database(tmp_path):
    data_dir = tmp_path / "not" / "there" / "yet"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=REPO,
        env={**env, "SDXL_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (data_dir / "db.sqlite3").is_file()
