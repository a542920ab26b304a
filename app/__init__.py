"""The Gradio demo (``dit-sparse demo``): dense and sparse generations of one prompt side by side.

``dit_sparse.app.core`` holds what the demo computes and imports no gradio; ``dit_sparse.app.ui`` builds the
gradio Blocks (gradio is imported only there, on first use).

    from dit_sparse.app import launch
    launch()                       # bundled tiny model, shipped profile, http://127.0.0.1:7860
"""

from __future__ import annotations

from typing import Any


def launch(*args: Any, **kwargs: Any) -> Any:
    """Serve the demo (see :func:`dit_sparse.app.ui.launch`); needs ``pip install 'dit-sparse[demo]'``."""
    from .ui import launch as _launch

    return _launch(*args, **kwargs)


__all__ = ["launch"]
