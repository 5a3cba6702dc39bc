"""`otterfast serve MODEL_DIR`: a trained model behind an OpenAI-style HTTP API and a web chat page (docs/serve.md).

    cli.py      `otterfast serve` and `otterfast bench serve` (benches/serve.py)
    app.py      the Starlette app: routes, JSON errors, the body-size limit, server-sent events
    schema.py   the request body (pydantic) and the server's limits
    chat.py     messages -> the model's prompt and images (earlier turns are in-context examples)
    images.py   data URLs -> RGB images, bounds checked before decoding
    worker.py   the one thread that owns the model: a request queue, streaming, cancellation
    page/       the chat page (one static HTML file)

Nothing here is imported by `otterfast --help`; the server's libraries load when the command runs.
"""
