"""The admin HTTP API: a JSON API over `fleet/`, authenticated with scoped bearer tokens."""
