"""The package version, in a leaf module every other module can import at the top."""

__version__ = "0.1.0"
