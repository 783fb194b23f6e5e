"""The ``provisioning`` command-line interface."""
