"""Gin configs; a package so that gin resolves `include` paths from any working directory."""
