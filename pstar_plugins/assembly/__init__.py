"""Putting a method on a model: the plugin registry, building and freezing, loading an adapter,
and the wrapped model."""
