"""Launchers, local clusters, network shaping and the end-to-end demo."""
