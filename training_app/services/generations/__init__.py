"""Image generation requests, by stage.

- `requests`: the web process checks a request against the database, records it as a
  Generation and enqueues its id once committed;
- `batches`: the generation worker claims the row with the queued requests that can share
  its batch, generates, writes the PNGs and marks the rows finished;
- `lifecycle`: the job kind and what any stage does to a row: wait on it, cancel it, end it
  in error, send its events, read its body and images.
"""
