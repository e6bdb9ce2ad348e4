"""One exception type for errors a user must act on.

The CLI prints these as a single line (no traceback): the message names the file,
key or record at fault and the fix.
"""


class SlmError(Exception):
    pass
