"""The `deltatune` command line: one typer app, one module per job (see app.py)."""
