"""A package, so that pytest imports this directory's conftest as `tests.conftest`, not as a second top-level
`conftest` that would shadow tests/conftest.py (whose helpers tests/ import with `from conftest import ...`)."""
