"""``python -m loraplex.train CONFIG [--resume] ...`` (same as ``loraplex train``)."""

from loraplex.train.cli import main

if __name__ == "__main__":
    main()
