"""Per-model adapters: how each diffusers family lays out its tokens."""
