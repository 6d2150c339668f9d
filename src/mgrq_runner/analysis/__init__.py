"""Offline analysis of finished runs: reading them back (``runs``), the published numbers (``published``),
tables (``tables``), plots (``plots``) and the ``mgrq-collect`` command (``collect``). Nothing here runs a model."""
