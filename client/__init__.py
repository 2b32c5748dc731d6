"""Client library for the identity worker."""
