"""``slimlm serve``: an OpenAI-compatible HTTP server on the engine (see :func:`slimlm.serve.app.build_app`)."""
