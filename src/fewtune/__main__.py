"""``python -m fewtune``: the same command as ``fewtune`` (the web UI starts training runs this way)."""

from fewtune.cli import main

if __name__ == "__main__":
    main()
