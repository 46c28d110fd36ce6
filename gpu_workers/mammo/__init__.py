"""Micro-calcification detection in mammograms (the founding paper's first proof of concept)."""
