"""Tests that start the service's real processes (gunicorn, `serve`, workers, a browser):
marked e2e, minutes long; bin/check leaves them to bin/test."""
