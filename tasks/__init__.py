"""Prefect tasks, one per pipeline stage: read input artifacts, call the library, write outputs atomically."""
