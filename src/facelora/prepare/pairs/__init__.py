"""Pairing before/after images and scoring each pair."""
