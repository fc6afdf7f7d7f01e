"""headrace.models."""
