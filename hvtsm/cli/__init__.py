"""The `hvtsm` command line. Only this package turns errors into messages and exit codes."""
