"""Catalog adapters: a request's search criteria or URL patterns become products."""
