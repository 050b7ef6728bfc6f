"""Fault drills: each test ends with every acknowledged message stored exactly once."""
