"""Shared test set-up: keep every test offline and away from the user's cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFMESH_DEVICE", "cpu")
