"""headrace.runners."""
