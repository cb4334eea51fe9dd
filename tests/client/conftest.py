"""The client is imported from its source folder (client/), not installed: the test venv
is the service's, and the package needs nothing but httpx, which that venv has. The
fresh-clone test installs it for real (pip install ./client)."""

import sys
from pathlib import Path

CLIENT_SOURCE = Path(__file__).resolve().parents[2] / "client"
if str(CLIENT_SOURCE) not in sys.path:
    sys.path.insert(0, str(CLIENT_SOURCE))
