"""Inference backends behind one runner contract."""
