"""Serving fine-tuned runs over HTTP: `finegrain serve RUN_DIR ...` (see docs/SERVING.md).

    models.py    one copy of each base model, adapters switched per batch (`ModelRegistry`)
    batching.py  bounded queue + one worker thread that runs requests in dynamic batches
    engine.py    what a batch runs: a task's forward pass and decoding, or generation
    app.py       the FastAPI app: endpoints, errors, request logs, metrics
    security.py  API keys, rate limits, body limits, where the server may listen
    metrics.py   Prometheus text format
    logs.py      JSON logs, PII masking
    cli.py       the command and the uvicorn runner (graceful drain on SIGTERM)
    workers.py   --workers N: worker processes on one port, the base weights mapped from one shared file
    settings.py  the limits and batching settings

Nothing is imported here, so that `finegrain --help` does not wait for torch and fastapi.
"""
