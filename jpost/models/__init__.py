"""Decoder models, heads and checkpoint import/export."""
