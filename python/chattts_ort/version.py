"""The package version (also written into every manifest an export makes)."""
__version__ = "0.4.0"
