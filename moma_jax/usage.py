"""What a tool's user is told when something goes wrong: one line.

  UsageError        the error a tool's caller can fix: a bad flag, path or argument
  first_line(e)     an exception's message cut to one line, to quote inside another

UsageError is raised by library code (the trainer's workdir checks, the compile
topology) as well as by the command-line tools, which report it as one line and exit
code 2 (moma_jax/cli/command.py). Errors that wrap a lower-level one (a corrupt shard,
an unreadable checkpoint) quote it with `first_line`, so they stay one line too.
Importing this module needs nothing beyond Python.
"""

# A quoted message longer than this is cut: the line it sits in must stay readable.
FIRST_LINE_CHARS = 200


class UsageError(Exception):
  """A mistake in how a tool was called; reported as one line, exit code 2."""


def first_line(error: BaseException, with_type: bool = False) -> str:
  """The first line of `error`'s message, at most FIRST_LINE_CHARS characters.

  Args:
    error: the exception to quote; libraries (array_record, TFDS, Orbax) often give
      several lines, whose first says what went wrong.
    with_type: prefix the exception's type name, 'ValueError: ...', for errors of
      assorted types; an empty message then leaves just 'ValueError: '.

  Returns:
    The line; without with_type, the type name if the message is empty.
  """
  lines = str(error).splitlines()
  if with_type:
    return f'{type(error).__name__}: {lines[0][:FIRST_LINE_CHARS] if lines else ""}'
  return lines[0][:FIRST_LINE_CHARS] if lines else type(error).__name__
