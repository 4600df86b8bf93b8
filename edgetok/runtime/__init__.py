"""What runs a model (runners, plugin registration): below both ``eval`` and ``profile``."""
