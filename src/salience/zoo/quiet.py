"""Quiet loading of Hugging Face models: our CLI prints its own output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' loading progress bars and info logs (our CLI prints its own output)."""
    from transformers.utils import logging

    bars_were_on = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars_were_on:
            logging.enable_progress_bar()
