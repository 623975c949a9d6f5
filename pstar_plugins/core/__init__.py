"""Method-independent machinery: wrapping, freezing, attention injection, adapter files."""
