"""``python -m lorae`` runs the CLI."""

from lorae.cli import main

if __name__ == "__main__":
    main()
