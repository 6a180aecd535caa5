"""Installing software through the login view, side by side (issue 16): see ``run.py``."""
