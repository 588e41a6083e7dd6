"""Calibration observers."""
