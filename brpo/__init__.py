"""Anytime reasoning with Budget Relative Policy Optimization: the method as pure functions."""
