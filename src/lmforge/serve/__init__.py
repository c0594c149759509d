"""Serving: an OpenAI-compatible HTTP API with a browser playground (`app`), the worker threads and bounded
queue that run the model (`worker`), and the terminal chat (`terminal`). FastAPI and uvicorn are needed
only here, so `import lmforge` works without them."""
