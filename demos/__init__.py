"""Gradio demos of guidance-decoding (``python -m demos.app``)."""
