"""Experiment runner (runner.py) and experiment files (*.json): evaluate.py --experiments FILE."""
