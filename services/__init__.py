"""Business rules of the identity worker."""
