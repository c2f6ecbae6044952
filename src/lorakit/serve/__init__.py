"""Serving many adapters over one base model: the engine (continuous batching, adapters in
device slots), the OpenAI-compatible HTTP server, and the export/launch path to vLLM and SGLang.

See docs/serving.md. The HTTP parts need the ``serve`` extra (``pip install lorakit[serve]``).
"""
