"""The client from its source folder, as tests/client/ imports it."""

import tests.client.conftest  # noqa: F401 - puts client/ on sys.path
