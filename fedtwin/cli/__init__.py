"""The ``fedtwin`` command line (typer + rich)."""
