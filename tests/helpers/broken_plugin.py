"""A defense plug-in whose module fails while it is imported, as a broken third-party package would."""

raise RuntimeError("this plug-in needs a library that is not installed")
