"""The base of the errors that every stage raises for bad input or state."""


class MarstoreError(Exception):
    """Bad input or state, said in one line that names the bad thing and what would be right;
    the command line prints it as `marstore COMMAND: message` and exits with status 2."""
