"""The embedded demo: legacy Sentry-shaped tables with realistic data on the SQLite default."""
