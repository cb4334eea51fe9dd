"""Tests that start the service's real processes (gunicorn, `serve`, workers) or a browser:
marked e2e (the admin's browser test: browser), minutes long; bin/check leaves them to
bin/test."""
