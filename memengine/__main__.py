"""`python -m memengine ...`: see memengine.cli."""

from memengine.cli import main

if __name__ == "__main__":
    main()
