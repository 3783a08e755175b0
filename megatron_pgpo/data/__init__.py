"""Prompts and images: the built-in synthetic visual tasks and local dataset files."""
