"""The worker process: `manage.py worker`'s loop around its django-q2 cluster, its
heartbeat rows, and `manage.py doctor`'s checks. What a job's own process does (claim,
heartbeat, finish) is training_app.jobs'; its loaded pipelines are training_app.runtime's."""
