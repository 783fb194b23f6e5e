"""``python -m services`` and the ``provisioning-orchestrator`` console script."""

from services import shutdown

__all__ = ["run"]


def run() -> None:
    """Catch stop signals first, then import and run the service (imports take a while)."""
    shutdown.install()
    from services.runner import main

    main()


if __name__ == "__main__":
    run()
