"""Shared pytest set-up; fixtures live in plugin modules, one per concern."""

pytest_plugins = ["fixtures_dist", "fixtures_s3"]
