"""Redirect URIs: the RFC 3986 parser, hosts, the RFC 6749/8252/9700 rules, audit, reports."""
