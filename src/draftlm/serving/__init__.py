"""`draftlm serve`: an OpenAI-compatible HTTP server (`command` the CLI verb, `app` the
FastAPI app, `routes` its endpoints, `gate` the request gate (auth, body size, queue),
`protocol` the wire format, `worker` the generation thread and metrics).

Only `command` is imported by the CLI; FastAPI and pydantic load when the server starts.
"""

# Largest request body accepted (413 above it): both the command's flag default and the
# app's own default, so a server built in Python behaves like `draftlm serve`.
DEFAULT_MAX_BODY_BYTES = 1 << 20
