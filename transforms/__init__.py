"""headrace.transforms."""
