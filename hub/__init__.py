"""hub: an omnichannel conversation hub."""

__version__ = "0.1.0"
