"""Compiler passes, one per module. The order they run in lives in bcpc/pipeline.py only."""
