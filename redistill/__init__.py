"""ReDistill Edge: distill, export, deploy and measure peak-memory-lean CNN students."""

__version__ = "0.1.0"
