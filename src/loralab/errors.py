"""User-facing errors.

Anything the user can fix (a bad file, key, value or path) is raised as `LoralabError` with a
one-line message that names the file/field/key and what was expected. The CLI prints it as
`error: ...` and exits with status 2, without a traceback.
"""


class LoralabError(Exception):
    """A mistake the user can fix; printed as one line, no traceback."""
