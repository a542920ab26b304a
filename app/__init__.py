"""The Gradio demo (dit-sparse demo)."""
