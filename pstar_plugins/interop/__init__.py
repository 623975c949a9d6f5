"""Moving adapters to and from other libraries."""
