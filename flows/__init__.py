"""Prefect flows composing the stage tasks, and the ``vlmprune`` command line."""
