"""Kaggle image competition pipeline."""
