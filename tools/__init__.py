"""Developer tools run from the repository root (`python -m tools.<name>`): regenerating docs/api.md and
executing the notebooks. Not part of the installed package."""
