"""`python -m bertrt`: the runtime's command line."""

from bertrt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
