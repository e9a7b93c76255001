"""What runs inside the OAuth server: ORM models, PKCE. Loads no alembic, click or rich."""
