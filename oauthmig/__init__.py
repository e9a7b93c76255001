"""oauthmig: safe OAuth 2.0 schema rollout toolkit."""
