"""`python -m xmoe ...` runs the trainer CLI."""

from xmoe.cli import main

if __name__ == "__main__":
    main()
