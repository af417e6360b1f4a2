"""Renderers of Explanations: terminal (rich), HTML (self-contained, escaped)."""
