"""`python cli.py ...` from a checkout: the same entry point as the `blip2-search` console script."""

from blip2_search.cli import main

if __name__ == "__main__":
    main()
