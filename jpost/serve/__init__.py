"""Serving: an OpenAI-compatible HTTP API over jpost's sampler with
continuous batching (engine), its routes and errors (api), and the Arena's
blind side-by-side voting pages and vote store (arena).

  python -m jpost.main --config=configs/serve.py --workdir=runs/serve
"""
