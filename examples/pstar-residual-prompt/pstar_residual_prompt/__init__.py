"""Residual prompt tuning for pstar-plugins."""
