"""Shipped profiles (JSON), read with importlib.resources."""
