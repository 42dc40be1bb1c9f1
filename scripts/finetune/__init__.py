"""Shared library behind the playbook fine-tuning scripts in this directory."""

__version__ = "0.1.0"
