"""Entry point placeholder."""


def main() -> None:
    """Run the certfleet CLI."""
