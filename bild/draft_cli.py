"""`python -m bild.draft_cli draft ...` as scripts/*.sh call it: the same as `bild draft ...` (bild/cli/draft.py)."""

if __name__ == "__main__":
    import sys

    from bild.cli import main

    sys.exit(main())
